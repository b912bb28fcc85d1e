"""Model lifecycle: the registry of model versions, traffic policies, routing, hot-swap, shadow
and canary (issue 17)."""
