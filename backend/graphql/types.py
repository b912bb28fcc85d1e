"""GraphQL object types of the platform itself (server facts, heartbeat)."""

from __future__ import annotations

from datetime import datetime

import strawberry


@strawberry.type(description="A capability and whether this server has it switched on.")
class Feature:
    name: str
    enabled: bool
    description: str


@strawberry.type(description="A model this server can serve from an installed package.")
class ModelInfo:
    name: str
    task: str
    version: str
    package: str
    installed: bool


@strawberry.type(description="What this server is and what it can do.")
class ServerInfo:
    version: str
    environment: str
    uptime_seconds: float
    server_time: datetime
    features: list[Feature]
    models: list[ModelInfo]


@strawberry.type(description="One tick of the heartbeat subscription.")
class Heartbeat:
    seq: int = strawberry.field(description="0 for the first tick, then +1 per tick.")
    at: datetime = strawberry.field(description="Server time of the tick (UTC).")
