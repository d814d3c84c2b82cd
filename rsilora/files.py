"""Safe file output: atomic writes and refusing to clobber existing results."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class OutputExistsError(FileExistsError):
    """An output path already holds results and the caller did not ask to overwrite them."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader never sees a half-written file: either the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented UTF-8 JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def csv_text(rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV with a header; columns in first-seen key order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def replace_dir(staging: str | Path, final: str | Path) -> Path:
    """Move a fully written ``staging`` folder to ``final``, replacing what was there.

    The old folder is renamed away first and deleted last, so a crash leaves either the old or the
    new folder in place (plus, at worst, a stray ``.old`` folder), never a half-written one.
    """
    staging, final = Path(staging), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def prepare_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create ``path`` for new results; refuse a non-empty folder unless ``overwrite`` is set."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"{path} already exists and is not empty; choose another output folder "
                "or pass --overwrite to replace it"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
