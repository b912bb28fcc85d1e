"""`python -m backend` is the `sightline` command."""

from backend.cli import app

app()
