"""A screenshot of the page ``knnformer serve`` shows, for the README: the run served on 127.0.0.1 in this
process, the system Chromium (headless, through Playwright; no browser is downloaded) generating one completion.

    python -m bench.serve_page --run RUN [--prompt TEXT] [--out docs/serve-page.png]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window breaks? It is the east,\n")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "serve-page.png"))
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    from knnformer.serve.background import BackgroundServer
    from knnformer.serve.server import open_service

    with BackgroundServer(open_service(args.run, max_batch=2)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('facts').textContent.includes('parameters')")
        page.fill("[data-testid=prompt]", args.prompt)
        page.fill("#max-tokens", str(args.max_tokens))
        page.fill("#seed", str(args.seed))
        page.click("[data-testid=generate]")
        page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
        cited = page.locator("[data-testid=cited]")
        if cited.count() > 2:
            cited.nth(2).click()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
        print(page.inner_text("[data-testid=status]"), "->", args.out)
        browser.close()


if __name__ == "__main__":
    main()
