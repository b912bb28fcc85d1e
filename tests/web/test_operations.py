"""The demo page's operations view in a real browser (Debian's chromium through Playwright) on
a live server after a workload: a toy classifier rolled out (shadow, canary, promotion) at a
price, then dark images after the photos it served (drift), and refused requests. An admin sees
charts drawn with data (drift with its threshold) and the version events; a member sees no
Operations link."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.auth.passwords import hash_password
from backend.config import CostSettings, DriftSettings, LimitsSettings, Settings
from backend.core.db import Database
from backend.core.models import Tenant, User, UserRole
from tests.accounts import PASSWORD
from tests.conftest import scaled, serve_live
from tests.lifecycle.rollout import rollout
from tests.lifecycle.test_drift import _png
from tests.lifecycle.test_vision_swap import served, token_of
from tests.vision.test_graphql import vision_on
from tests.web.test_demo import CHROMIUM, page, screenshots_module, signed_in  # noqa: F401

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed"
)
ADMIN = "admin@ops.example"
# small windows, compared when the test says (check()), not in the background
DRIFT = DriftSettings(reference_size=4, window_size=4, min_samples=2, interval_s=3600.0)
# a price the cost chart can show (the toy computes for a few milliseconds)
COST = CostSettings(compute_second_prices={"cpu": 0.5, "cuda": 0.5, "remote": 0.5})
# SIGHTLINE_README_SHOTS=docs/screenshots: the README's picture, the same workload spread over
# a few minutes (with a rolled-back canary and images darkening step by step) and written there
README_SHOTS = os.environ.get("SIGHTLINE_README_SHOTS")
README_PAUSE = 20.0 if README_SHOTS else 0.0
README_ROLLOUT: dict[str, Any] = {"pause": README_PAUSE, "rolled_back": bool(README_SHOTS)}
README_DRIFT = (160, 120, 80, 30, 30) if README_SHOTS else (30, 30)


@pytest.fixture
async def admin(settings: Settings, engine: AsyncEngine) -> dict[str, Any]:
    """A committed tenant with an admin (the live server cannot see rolled-back rows)."""
    db = Database.connect(engine.url.render_as_string(hide_password=False), settings.database)
    try:
        slug = f"ops-{secrets.token_hex(4)}"
        async with db.session() as session:
            tenant = Tenant(slug=slug, name="Ops")
            session.add(tenant)
        async with db.session(tenant.id) as session:
            session.add(
                User(
                    tenant_id=tenant.id,
                    email=ADMIN,
                    role=UserRole.ADMIN,
                    password_hash=await hash_password(PASSWORD),
                )
            )
    finally:
        await db.dispose()
    return {"tenant": slug}


def _figure(page: Page, caption: str) -> Any:  # noqa: F811
    return page.locator("figure.chart").filter(has=page.locator("figcaption", has_text=caption))


@pytest.mark.timeout(scaled(600))
async def test_an_admin_sees_the_operations_charts_after_a_workload(
    page: Page,  # noqa: F811
    settings: Settings,
    engine: AsyncEngine,
    admin: dict[str, Any],
    account: dict[str, Any],
    tmp_path: Path,
) -> None:
    settings.drift, settings.cost = DRIFT, COST
    settings.limits = LimitsSettings(enabled=False)  # more jobs in a few seconds than a free plan's
    async with serve_live(vision_on(settings)) as server:
        model = await rollout(server.services, admin["tenant"], ADMIN, **README_ROLLOUT)
        # version 2's reference is the photos it served; dark images then drift from them
        assert server.services.lifecycle is not None
        watch = server.services.lifecycle.drift_watch
        assert watch is not None
        await watch.samples.flush()
        await watch.check()
        for brightness in README_DRIFT:
            await asyncio.sleep(README_PAUSE)
            for _ in range(DRIFT.window_size // 2):
                await served(server.services, admin["tenant"], model, ADMIN, _png(brightness))
            await watch.samples.flush()
            drifted = await watch.check()
        assert any(s.name == "image_brightness" and s.exceeded for s in drifted[(model, "2")])
        token = await token_of(server, admin["tenant"], ADMIN)
        async with httpx.AsyncClient(base_url=server.http_url) as http:  # typed errors
            for _ in range(2):
                await http.post(
                    "/graphql",
                    json={"query": '{ model(name: "nope") { name } }'},
                    headers={"authorization": f"Bearer {token}"},
                )
        # the page reads the figures once, then every 30 s: they must be in Redis before it
        # loads (the periodic flush can come late on a busy machine; CI once missed the errors)
        await server.services.lifecycle.flush()

        await signed_in(page, server, admin, ADMIN, PASSWORD)
        await page.get_by_role("link", name="Operations").click()
        await expect(page.get_by_role("heading", name="Operations")).to_be_visible()
        await expect(page.get_by_role("status")).to_contain_text("model versions", timeout=30_000)

        latency = _figure(page, "Latency")
        await expect(latency.get_by_role("img")).to_be_visible()
        legend = latency.get_by_role("list")
        await expect(legend).to_contain_text(f"{model}@1 p95")
        await expect(legend).to_contain_text(f"{model}@2 p95")
        assert await latency.locator("path.series").count() >= 4  # p50 and p95 of both
        # the rollout's version events, marked on the time axis and listed
        marks = latency.locator("g.event")
        await expect(marks.filter(has_text=f"promote: {model}@2")).to_have_count(1)
        await expect(marks.filter(has_text=f"canary: {model}@2")).not_to_have_count(0)
        events = page.get_by_role("list", name="Version events")
        await expect(events).to_contain_text(f"promote {model}@2")
        await expect(events).to_contain_text(f"shadow {model}@2")

        requests = _figure(page, "Requests and errors")
        await expect(requests.get_by_role("list")).to_contain_text(f"{model}@2")
        cost = _figure(page, "Cost")
        await expect(cost.get_by_role("list")).to_contain_text(f"{model}@2")
        errors = _figure(page, "Errors by code")
        await expect(errors.get_by_role("list")).to_contain_text(re.compile(r"[A-Z_]{5,}"))
        # the live version's drift: each signal that moved, with its threshold (dashed)
        drift = _figure(page, f"Drift: {model}@2")
        await expect(drift.get_by_role("img")).to_be_visible()
        series = drift.locator("path.series")
        await expect(series.filter(has_text="image_brightness")).not_to_have_count(0)
        await expect(series.filter(has_text="threshold")).not_to_have_count(0)
        await expect(drift.get_by_role("list")).to_contain_text("image_brightness")
        await expect(drift.get_by_role("list")).to_contain_text("threshold")

        shots = Path(README_SHOTS) if README_SHOTS else tmp_path / "shots"
        written = await screenshots_module().capture(
            server.http_url, token, shots, pages=("operations",)
        )
        assert len(written) == 2
        assert all(p.stat().st_size > 5_000 for p in written)

        # a member has no Operations link
        await page.evaluate("sessionStorage.clear()")
        await signed_in(page, server, account)
        await expect(page.get_by_role("link", name="Usage")).to_be_visible()
        await expect(page.get_by_role("link", name="Operations")).to_have_count(0)
