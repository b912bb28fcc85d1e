"""Run event logs (Redis Streams), resumable subscriptions with durable cursors."""
