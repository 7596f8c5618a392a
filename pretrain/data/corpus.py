"""Text sources: the embedded default corpus and Hugging Face `datasets` inputs.

The embedded corpus ships with every Python installation, so the demo and the tests download nothing:
the documentation topics of ``pydoc_data`` (one document per topic) and the docstrings of the standard
library read with ``ast`` from the source files (one document per module; nothing is imported, so no
module runs). Document order is sorted and fixed, and megatron-core's document split then divides it
deterministically into train and validation.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from pretrain.config import DataConfig, SourceConfig
from pretrain.config.data import COMPRESSION, suffix_type
from pretrain.errors import UserError

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "ensurepip"}


def embedded_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text
    for path in _stdlib_sources():
        text = _module_docstrings(path)
        if text:
            yield text


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files)


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def source_type(src: SourceConfig) -> str:
    """The reader of a source: its ``type``, or for ``auto`` the one its suffix names (never the hub)."""
    return src.type if src.type != "auto" else suffix_type(src.path)


def _check_text_file(path: str) -> None:
    """An empty or non-UTF-8 text file, named before `datasets` fails on it without saying why."""
    if os.path.getsize(path) == 0:
        raise UserError(f"data source file '{path}' is empty; remove it from data.sources or fill it.")
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not path.endswith(COMPRESSION):
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # not just a character cut at the end of the sample
                raise UserError(f"data source file '{path}' is not UTF-8 text (byte {e.start} is 0x{head[e.start]:02x}); "
                                "convert it to UTF-8 (e.g. iconv) first.") from None


def _json_problem(files: list[str]) -> str | None:
    """The first empty file or line that is no JSON among ``files`` and the fix (read only after `datasets` failed,
    whose own messages name neither: an empty file gives a bare StopIteration)."""
    import json

    for file in files:
        if not file.endswith((".json", ".jsonl")):  # (a compressed file: not read here)
            continue
        with open(file, encoding="utf-8", errors="replace") as f:
            head = f.read(4096).lstrip()
            if not head:
                return f"'{file}' is empty; drop it from data.sources (or from the glob)"
            f.seek(0)
            if head[0] == "[":  # one JSON document (a list of records), not JSON Lines
                try:
                    json.load(f)
                except ValueError as e:
                    return f"'{file}' is not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix it there"
                continue
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as e:
                        return (f"line {number} of '{file}' is not a JSON record ({e.msg}, column {e.colno}); JSON Lines "
                                "hold one object per line: fix that line or drop it")
    return None


def source_documents(src: SourceConfig, text_field_fix: str = "set data.sources[].text_field") -> Iterator[str]:
    """Documents of one source, read through Hugging Face `datasets`; ``text_field_fix`` is what the message for a
    missing text column tells to do (set a config key, or give a command's option)."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()  # (its per-split bars; our own progress says what is read)

    kind = source_type(src)
    if kind == "hub":
        try:
            ds = load_dataset(src.path, src.name or None, split=src.split)
        except Exception as e:  # noqa: BLE001 - `datasets` raises many types for an unreachable hub name
            raise UserError(f"data source '{src.path}' is neither a local file (.txt/.jsonl/.json/.parquet) nor a "
                            f"Hugging Face hub dataset that could be loaded ({type(e).__name__}: {e}). Check the "
                            "path, or set `type` when the suffix does not say the format.") from None
    else:
        files = sorted(glob.glob(src.path))
        if not files:
            raise UserError(f"data source '{src.path}' matches no file; fix data.sources[].path "
                            "(a file or a glob relative to where you run pretrain).")
        folders = [f for f in files if os.path.isdir(f)]
        if folders:
            raise UserError(f"data source '{src.path}' names the directory '{folders[0]}'; give its files with a "
                            f"glob, such as '{os.path.join(folders[0], '*.txt')}'.")
        if kind == "text":
            for file in files:
                _check_text_file(file)
        try:
            ds = load_dataset(kind, data_files=files, split=src.split)
        except Exception as e:  # noqa: BLE001
            from json import JSONDecodeError

            from datasets.exceptions import DatasetGenerationError
            from pyarrow import ArrowInvalid

            json_error = isinstance(e, (StopIteration, DatasetGenerationError, ArrowInvalid, JSONDecodeError))
            where = _json_problem(files) if kind == "json" and json_error else None
            if where:
                raise UserError(f"could not read data source '{src.path}' as JSON: {where}.") from None
            raise UserError(f"could not read '{src.path}' as {kind}: {type(e).__name__}: {e}") from None
    if src.text_field not in ds.column_names:
        raise UserError(f"data source '{src.path}' has no column '{src.text_field}' (columns: "
                        f"{', '.join(ds.column_names)}); {text_field_fix}.")
    for text in ds[src.text_field]:
        if isinstance(text, str) and text.strip():
            yield text


def documents(data: DataConfig, text_field_fix: str = "set data.sources[].text_field") -> Iterator[str]:
    """All documents of the configured sources in a fixed order; the embedded corpus when none is set."""
    if not data.sources:
        for i, doc in enumerate(embedded_documents()):
            if data.embedded_docs and i >= data.embedded_docs:
                return
            yield doc
        return
    for src in data.sources:
        yield from source_documents(src, text_field_fix)


def fingerprint(data: DataConfig) -> str:
    """Identifies the configured text: preprocessed files with another fingerprint are stale."""
    h = hashlib.sha256()
    if not data.sources:
        h.update(f"embedded:{sys.version}:{data.embedded_docs}".encode())
    for src in data.sources:
        h.update(repr((src.path, source_type(src), src.text_field, src.split, src.name)).encode())
        for f in sorted(glob.glob(src.path)):
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
