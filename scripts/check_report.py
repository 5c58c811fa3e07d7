"""Open a rendered report in headless Chromium and check what a reader would see.

    python scripts/check_report.py reports/<name>/index.html [--chromium PATH] [--screenshot PNG]

Passes (exit 0) when every <img> on the page decoded to a picture with a size, a click on a
sortable table's header sorts that column, and the page logged no console error and raised no
script error; exit 1 lists what failed; ``--screenshot`` saves the whole page as a PNG for a
reviewer (as it opens). Exit 2 when it
cannot run (no playwright, no Chromium). Uses the system's Chromium (Debian: ``apt install
chromium``) through playwright (``pip install playwright``); nothing is downloaded. The page is
opened with the network blocked, so a report that needs the network fails here too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
BROKEN_IMAGES = """() => Array.from(document.images)
    .filter(img => !img.complete || img.naturalWidth === 0)
    .map(img => img.alt || img.src.slice(0, 60))"""
# Click the third header of each sortable table twice (descending, then ascending) and return
# the tables whose numbers did not come out in order.
SORT_CHECK = """() => Array.from(document.querySelectorAll("table.sortable")).flatMap((t, k) => {
    const th = t.tHead.rows[0].cells;
    if (th.length < 3) return [];
    const col = () => Array.from(t.tBodies[0].rows).map(r => r.cells[2].dataset.v)
        .filter(v => v !== "" && !isNaN(parseFloat(v))).map(parseFloat);
    th[2].click();
    const down = col();
    th[2].click();
    const up = col();
    const sorted = (xs, sign) => xs.every((x, i) => i === 0 || sign * (x - xs[i - 1]) >= 0);
    return sorted(down, -1) && sorted(up, 1) ? [] : [`table ${k + 1}: ${th[2].textContent}`];
})"""


def find_chromium(given: str | None) -> str | None:
    if given:
        return given if Path(given).exists() else shutil.which(given)
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


def check_page(
    page_path: Path, chromium: str, screenshot: Path | None = None
) -> tuple[int, list[str]]:
    """(number of images, problems) of the page as headless Chromium renders it."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page()
        page.route("http*://**", lambda route: route.abort())  # offline, as the report promises
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        images = page.evaluate("document.images.length")
        problems += [f"broken image: {name}" for name in page.evaluate(BROKEN_IMAGES)]
        if screenshot is not None:  # before the sort check reorders the tables
            page.set_viewport_size({"width": 1300, "height": 900})
            page.screenshot(path=str(screenshot), full_page=True)
        problems += [f"does not sort: {name}" for name in page.evaluate(SORT_CHECK)]
        browser.close()
    return images, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="a report's index.html")
    parser.add_argument("--chromium", help="the browser to use (default: found on PATH)")
    parser.add_argument("--screenshot", type=Path, help="save the whole page as this PNG")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if not args.page.is_file():
        print(f"{args.page}: no such file", file=sys.stderr)
        return 2
    if chromium is None:
        print("no Chromium found: apt install chromium, or pass --chromium", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("playwright is not installed: pip install playwright", file=sys.stderr)
        return 2
    images, problems = check_page(args.page, chromium, args.screenshot)
    for line in problems:
        print(line)
    verdict = "FAIL" if problems or not images else "ok"
    print(f"{verdict}: {args.page}: {images} images, {len(problems)} problems ({chromium})")
    if args.screenshot is not None:
        print(f"screenshot: {args.screenshot}")
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
