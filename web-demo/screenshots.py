"""Screenshots of every page of the demo at desktop and phone width (Debian's chromium through
Playwright). Run by the browser tests into a temporary folder; run by hand for the README:

    python web-demo/screenshots.py http://127.0.0.1:8000 TOKEN docs/screenshots [operations,...]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from playwright.async_api import async_playwright

CHROMIUM = "/usr/bin/chromium"
PAGES = ("chat", "documents", "images", "camera", "usage")
LOADED = "!document.querySelector('main .status')?.textContent?.startsWith('Loading')"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}


async def capture(
    base_url: str, token: str, out: Path, pages: tuple[str, ...] = PAGES
) -> list[Path]:
    """Every page of `pages` at every size, signed in with `token`; returns the files written
    (the operations view is an admin's: tests/web/test_operations.py takes it)."""
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    written: list[Path] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for size, (width, height) in SIZES.items():
                page = await browser.new_page(viewport={"width": width, "height": height})
                await page.goto(base_url + "/")
                await page.evaluate("t => sessionStorage.setItem('sightline.token', t)", token)
                for name in pages:
                    await page.goto(f"{base_url}/#/{name}")
                    await page.reload()
                    await page.wait_for_selector("main section")
                    # pages that load (usage, operations) say "Loading…" until they have drawn
                    await page.wait_for_function(LOADED)
                    await page.wait_for_timeout(300)
                    path = out / f"{name}-{size}.png"
                    await page.screenshot(path=str(path), full_page=True)
                    written.append(path)
                await page.close()
        finally:
            await browser.close()
    return written


if __name__ == "__main__":
    chosen = tuple(sys.argv[4].split(",")) if len(sys.argv) > 4 else PAGES
    asyncio.run(capture(sys.argv[1], sys.argv[2], Path(sys.argv[3]), chosen))
