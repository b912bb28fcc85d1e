"""Durable conversation and message history."""
