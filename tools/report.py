"""Render benchmark JSON (from ``sparsecoll-bench ... --json``) as the README's markdown tables.

    python tools/report.py bench-results/allreduce-4.json bench-results/sparse-25M-1gbit.json

Each table is followed by the machine and date the numbers came from, so a reader can tell
where a figure was measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TABLES = {
    "collectives": [("size", "size"), ("op", "op"), ("time_us", "ours (us)"), ("busbw", "ours busbw GB/s"),
                    ("gloo_time_us", "Gloo (us)"), ("gloo_busbw", "Gloo busbw GB/s"),
                    ("ratio", "busbw ours/Gloo"), ("wrong", "#wrong")],
    "sparse": [("ranks", "P"), ("algorithm", "algorithm"), ("time_ms", "time (ms)"),
               ("bytes_sent", "bytes/rank"), ("formula_bytes", "formula"),
               ("speedup_vs_gloo", "x faster than Gloo dense"), ("wrong", "#wrong")],
    "soak": [("rank", "rank"), ("iterations", "calls"), ("errors", "errors"),
             ("rss_growth_pct", "RSS +%"), ("fds_before", "fds before"), ("fds_after", "fds after")],
}


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def markdown(document: dict) -> str:
    """One benchmark document as a markdown table plus its provenance line."""
    columns = TABLES.get(document["benchmark"])
    rows = document["rows"]
    if columns is None:
        columns = [(key, key) for key in rows[0]]
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key, "-")) for key, _ in columns) + " |")
    machine = document["machine"]
    lines.append(f"\n_{machine['date']}, {machine['host']}: {machine['cpus']} CPUs, Python "
                 f"{machine['python']}, torch {machine['torch']}._")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        print(markdown(json.loads(Path(path).read_text())))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
