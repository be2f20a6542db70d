"""Assemble docs/benchmarks.md from the sections in bench/results/ (written by the bench scripts)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Benchmarks

Written by `make bench` (`bench/report.py` joins the sections each benchmark script leaves in `bench/results/`).
Every figure names the command that produced it and the machine it ran on. Where a section says a GPU figure is
missing, no GPU was available to the session that ran it: no GPU number here is estimated.
"""


def main() -> None:
    sections = sorted((ROOT / "bench" / "results").glob("*.md"))
    text = HEADER + "\n" + "\n\n".join(p.read_text().rstrip() for p in sections) + "\n"
    out = ROOT / "docs" / "benchmarks.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {out} from {len(sections)} sections")


if __name__ == "__main__":
    main()
