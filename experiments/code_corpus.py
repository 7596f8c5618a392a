"""A larger text corpus from what any machine with Python has: the Python source files installed with it (the
standard library and site-packages), one JSON line per file, in sorted order, up to a size. The embedded corpus
(about 0.6M tokens) repeats many times in a GPU-sized run; this one gives tens of millions of tokens without a
download. The files differ between machines, so results on it are compared within one machine only.

    python experiments/code_corpus.py OUT.jsonl --mb 80
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path


def python_files() -> list[Path]:
    roots = sorted({Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib", "platlib")})
    files: set[Path] = set()
    for root in roots:
        files.update(p for p in root.rglob("*.py") if p.is_file() and "test" not in p.parent.name)
    return sorted(files)


def write_corpus(out: Path, megabytes: float) -> dict:
    """Write up to ``megabytes`` of UTF-8 Python sources (files between 1 kB and 1 MB) as JSON lines to ``out``."""
    limit, written, count = int(megabytes * 1e6), 0, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with tmp.open("w") as f:
        for path in python_files():
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not 1_000 <= len(text) <= 1_000_000:
                continue
            f.write(json.dumps({"text": text}) + "\n")
            written, count = written + len(text), count + 1
            if written >= limit:
                break
    tmp.replace(out)
    return {"files": count, "megabytes": round(written / 1e6, 1), "python": sys.version.split()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mb", type=float, default=80.0, help="stop after this many megabytes of text")
    args = parser.parse_args()
    print(write_corpus(args.out, args.mb))


if __name__ == "__main__":
    main()
