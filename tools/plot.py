"""Plot saved benchmark JSON (``sparsecoll-bench ... --json``) to PNG files.

    python tools/plot.py bench-results/run/*.json -o bench-results/run

Each FILE.json becomes DIR/FILE.png (see :mod:`sparsecoll.bench.plots`); a file that is not
a plottable benchmark is reported and skipped, and the exit status says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsecoll.bench.plots import plot_document
from sparsecoll.errors import InvalidArgumentError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="benchmark JSON files")
    parser.add_argument("-o", "--out", type=Path, required=True, help="directory for the PNG files")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.paths:
        try:
            written = plot_document(json.loads(path.read_text()), args.out / f"{path.stem}.png")
        except (InvalidArgumentError, KeyError, ValueError) as error:
            print(f"{path}: not plotted: {error}", file=sys.stderr)
            failed += 1
            continue
        print(written)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
