"""Keep the README's demo table true: compare it with the models table of a fresh `make demo` report.

    python benchmarks/readme_table.py                      # compare README.md with runs/tiny/report.md; exit 1 if they differ
    python benchmarks/readme_table.py --write              # replace the README's table with the report's

The README's table under "## What `make demo` shows" is the report's "## Models" table, row for row and digit for
digit (the demo is deterministic on a CPU: no stage stops on wall time, sampling is seeded per prompt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_SECTION = "## What `make demo` shows"


def table_after(text: str, heading: str) -> tuple[int, int]:
    """(start, end) line indices of the first markdown table after `heading`."""
    lines = text.splitlines()
    try:
        at = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        raise SystemExit(f"error: no '{heading}' section") from None
    start = next((i for i in range(at + 1, len(lines)) if lines[i].startswith("|")), None)
    if start is None:
        raise SystemExit(f"error: no table under '{heading}'")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return start, end


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=str(ROOT / "runs" / "tiny" / "report.md"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--write", action="store_true", help="Replace the README's table with the report's.")
    a = ap.parse_args()
    report = Path(a.report).read_text(encoding="utf-8")
    readme = Path(a.readme).read_text(encoding="utf-8")
    rs, re_ = table_after(report, "## Models")
    want = report.splitlines()[rs:re_]
    lines = readme.splitlines()
    s, e = table_after(readme, README_SECTION)
    have = lines[s:e]
    if have == want:
        print(f"README table equals {a.report} ({len(want) - 2} models)")
        return 0
    if a.write:
        Path(a.readme).write_text("\n".join(lines[:s] + want + lines[e:]) + "\n", encoding="utf-8")
        print(f"README table replaced with the one of {a.report}")
        return 0
    print(f"README table differs from {a.report}:")
    for line in have:
        if line not in want:
            print(f"  README: {line}")
    for line in want:
        if line not in have:
            print(f"  report: {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
