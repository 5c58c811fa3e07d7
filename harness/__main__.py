"""``python -m harness``: the main command (the sweep lands with the harness issue)."""

import sys


def main() -> int:
    print("usage: python -m harness [overrides...]  (the sweep runner is being built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
