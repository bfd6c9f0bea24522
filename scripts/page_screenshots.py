"""Screenshots of the page that `siglip-so400m serve --index` serves, at a desktop and a phone width,
taken in the system's chromium through Playwright (pip install playwright; apt-get install chromium).

    siglip-so400m serve --model CKPT --index EMB_DIR --port 8000 &
    python scripts/page_screenshots.py http://127.0.0.1:8000 "a red circle" --fold 0.995 --output docs/

Writes page-desktop.png (1280 px wide) and page-phone.png (390 px), reduced to 256 colours.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
from pathlib import Path

from PIL import Image

SIZES = {"desktop": (1280, 800), "phone": (390, 844)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("query", help="the text to search for")
    p.add_argument("--output", type=Path, default=Path("docs"), help="folder for the PNGs (default: docs)")
    p.add_argument("--fold", type=float, help="the page's near-duplicate threshold (default: the page's)")
    p.add_argument("--chromium", default=shutil.which("chromium"), help="the browser (default: chromium)")
    args = p.parse_args(argv)
    if not args.chromium:
        p.error("no chromium found: apt-get install chromium, or give --chromium PATH")
    from playwright.sync_api import sync_playwright

    args.output.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium,
                                     args=["--no-sandbox"] if os.geteuid() == 0 else [])
        for name, (width, height) in SIZES.items():
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.goto(args.url.rstrip("/") + "/")
            if args.fold is not None:
                page.fill("#fold-at", str(args.fold))
            page.fill("#q", args.query)
            page.keyboard.press("Enter")
            page.wait_for_selector("#results > li.hit img[src^='blob:']")
            page.wait_for_function("() => [...document.querySelectorAll('#results > li.hit > .thumb img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            page.click("#results > li.hit details summary")  # one hit's metadata, open
            png = page.screenshot()
            path = args.output / f"page-{name}.png"
            Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)
            print(f"{path}: {path.stat().st_size // 1024} KiB")
            page.close()
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
