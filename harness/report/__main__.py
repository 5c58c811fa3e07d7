"""``python -m harness.report RESULTS_DIR [...] [--name N] [--reference R] [--out DIR]``"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.report",
        description="Render results folders into one self-contained HTML report with CSV tables.",
    )
    parser.add_argument("results_dirs", nargs="+", type=Path, help="results/<run_id> folders")
    parser.add_argument("--name", help="report folder name (default: the run ids)")
    parser.add_argument("--reference", default="sdpa", help="variant speedups are relative to")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="parent folder")
    parser.add_argument(
        "--no-patterns", action="store_true", help="leave out the recorded attention patterns"
    )
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results_dirs if not p.exists()]
    if missing:  # shown as failed runs in the page, but the user most likely mistyped
        print(f"warning: not found: {', '.join(missing)}", file=sys.stderr)
    page = render(args.results_dirs, args.out, args.reference, args.name, not args.no_patterns)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
