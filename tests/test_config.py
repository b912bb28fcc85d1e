"""Settings: env prefixes, secret files, production refusals, and the README's table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.config import DEV_SECRET_KEY, Environment, Settings, VisionSettings, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SIGHTLINE_"):
            monkeypatch.delenv(name)


def test_defaults_are_embedded_development() -> None:
    settings = Settings()
    assert settings.env is Environment.DEVELOPMENT
    assert settings.database.url is None
    assert settings.redis.url is None
    assert settings.should_migrate_on_start  # embedded database: migrate at start


def test_nested_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", "postgresql://u:p@db:5432/app")
    monkeypatch.setenv("SIGHTLINE_GRAPHQL_MAX_DEPTH", "7")
    monkeypatch.setenv("SIGHTLINE_SERVER_CORS_ORIGINS", '["https://app.example"]')
    settings = Settings()
    assert settings.database.url is not None
    assert settings.database.url.get_secret_value() == "postgresql+asyncpg://u:p@db:5432/app"
    assert settings.graphql.max_depth == 7
    assert settings.server.cors_origins == ["https://app.example"]
    assert not settings.should_migrate_on_start  # an external database is migrated explicitly
    assert "p@db" not in repr(settings)  # secrets do not print


def test_secret_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("k" * 40 + "\n")
    monkeypatch.setenv("SIGHTLINE_SECURITY_SECRET_KEY_FILE", str(secret))
    assert Settings().security.secret_key.get_secret_value() == "k" * 40


def test_unreadable_secret_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SIGHTLINE_SECURITY_SECRET_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read SIGHTLINE_SECURITY_SECRET_KEY_FILE"):
        Settings()


def test_production_refuses_default_secret_and_embedded_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIGHTLINE_ENV", "production")
    with pytest.raises(ValidationError) as error:
        Settings()
    message = str(error.value)
    assert "SIGHTLINE_SECURITY_SECRET_KEY" in message
    assert "SIGHTLINE_DATABASE_URL" in message
    assert DEV_SECRET_KEY not in message

    monkeypatch.setenv("SIGHTLINE_SECURITY_SECRET_KEY", "s" * 48)
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", "postgresql://db/app")
    monkeypatch.setenv("SIGHTLINE_REDIS_URL", "redis://cache:6379/0")
    assert Settings().env is Environment.PRODUCTION


@pytest.mark.parametrize("url", ["mysql://db/app", "sqlite:///x.db"])
def test_only_postgresql_urls(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", url)
    with pytest.raises(ValidationError):
        Settings()


def test_readme_lists_every_setting() -> None:
    assert settings_table() in README.read_text(encoding="utf-8"), (
        "README's configuration table is stale: paste `sightline config` into it"
    )


def test_empty_secret_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_AUTH_BOOTSTRAP_ADMIN_PASSWORD", "")
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", "")
    settings = Settings()
    assert settings.auth.bootstrap_admin_password is None
    assert settings.database.url is None


def test_incomplete_oidc_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_AUTH_OIDC_ISSUER", "https://idp.example")
    with pytest.raises(ValidationError, match="OIDC_CLIENT_ID"):
        Settings()


def test_the_socket_message_limit_stays_above_the_frame_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One number configures the WebSocket transport; by default twice the live camera's
    frame limit, so an oversized frame is answered per frame instead of closing the socket."""
    assert Settings().ws_max_message_bytes == 2 * Settings().vision.live_max_frame_bytes
    monkeypatch.setenv("SIGHTLINE_VISION_LIVE_MAX_FRAME_BYTES", "3000000")
    assert Settings().ws_max_message_bytes == 6_000_000
    monkeypatch.setenv("SIGHTLINE_SERVER_MAX_WS_MESSAGE_BYTES", "8000000")
    assert Settings().ws_max_message_bytes == 8_000_000
    monkeypatch.setenv("SIGHTLINE_SERVER_MAX_WS_MESSAGE_BYTES", "1000000")
    with pytest.raises(ValidationError, match="LIVE_MAX_FRAME_BYTES"):
        Settings()
    monkeypatch.setenv("SIGHTLINE_VISION_ENABLED", "false")  # no live camera: any limit
    assert Settings().ws_max_message_bytes == 1_000_000


def test_vision_workers_share_the_usable_cores_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert VisionSettings().worker_threads() == 4
    assert VisionSettings(workers=2).worker_threads() == 2
    assert VisionSettings(workers=8).worker_threads() == 1  # never none
    monkeypatch.setenv("SIGHTLINE_VISION_THREADS", "3")
    assert VisionSettings(workers=2).worker_threads() == 3
