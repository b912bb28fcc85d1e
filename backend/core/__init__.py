"""Infrastructure that knows no domain: database, Redis, telemetry, metrics, embedded servers."""
