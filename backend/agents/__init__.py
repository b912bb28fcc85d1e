"""The chat agent: the LangGraph graph (Redis checkpointer for memory, tools, guard nodes), model
aliases, and runs: one agent turn each, executed in the background under a lease."""
