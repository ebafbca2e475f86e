"""The page at ``/`` in a real browser: the system's Chromium, headless, driven by Playwright (which must not
download a browser of its own). It submits a prompt, waits for the stream to finish, and checks that the
citations it shows are the datastore's real text at the stated byte spans. Skipped where Chromium is absent
(``scripts/setup.sh`` installs it where it can)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_serve import document_texts, prompt_of, served_run  # noqa: F401  the tiny run, a fixture

from knnformer.serve.background import BackgroundServer
from knnformer.serve.server import open_service

CHROMIUM = os.environ.get("KNNFORMER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium)")]


def open_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)


def test_the_page_streams_a_completion_and_shows_its_real_sources(served_run, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api")
    run, store = served_run
    docs = document_texts(store)
    with BackgroundServer(open_service(run, max_batch=2, max_queue=4)) as url, \
            sync_api.sync_playwright() as p:
        browser = open_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('facts').textContent.includes('parameters')")
            assert "run" in page.inner_text("[data-testid=run-name]")
            page.fill("[data-testid=prompt]", prompt_of(store))
            page.fill("#max-tokens", "48")
            page.fill("#seed", "1")
            page.click("[data-testid=generate]")
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=60_000)
            status = page.inner_text("[data-testid=status]")
            assert status.startswith("48 tokens"), status
            assert page.locator("[data-testid=cited]").count() >= 1
            sources = page.locator("[data-testid=source]")
            assert sources.count() >= 1
            for i in range(sources.count()):
                source = sources.nth(i)
                doc = source.locator("[data-testid=doc]").inner_text()
                a, b = (int(x) for x in source.locator("[data-testid=byte-span]").inner_text().split("–"))
                shown = source.locator("[data-testid=source-text]").inner_text()
                assert shown.startswith(docs[doc][a:b].decode())  # the chunk, then its continuation
                assert docs[doc][a:].decode().startswith(shown)
            # the overlap highlighted: the longest run a generated chunk shares with a source ([start in source, length])
            assert page.evaluate("longestShared('xxabcdyy', 'zzzabcdq')") == [3, 4]
            marks = page.locator("mark")
            for i in range(marks.count()):
                assert len(marks.nth(i).inner_text()) >= 3
            page.locator("[data-testid=cited]").first.click()
            shot = Path(os.environ.get("KNNFORMER_ARTIFACTS", tmp_path)) / "serve-page.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert outside == []  # nothing from outside the server: no CDN, no fonts
        finally:
            browser.close()
