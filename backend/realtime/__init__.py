"""Run event logs (Redis Streams) with durable cursors for resumable subscriptions, and the live
camera frame loop (the latest frame wins, paced per connection)."""
