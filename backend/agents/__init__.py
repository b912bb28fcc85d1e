"""The agent: runs (turns), and later the LangGraph graph with memory, tools and guards."""
