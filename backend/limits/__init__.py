"""Rate limits and token/compute budgets, atomic in Redis so they hold across replicas."""
