"""The demo page (built from web-demo/ by `npm run build`, committed): served at `/`."""

from pathlib import Path

STATIC = Path(__file__).parent / "static"
