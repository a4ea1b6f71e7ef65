"""The output directory: refuse to clobber a non-empty one unless asked, and publish atomically.

Everything is written into a temporary sibling directory (same file system) that is renamed onto
`--save_directory` only once the whole checkpoint and report are written, so a failed or
interrupted run leaves either nothing or the previous content, never a half-written checkpoint.
Single-file outputs (the JSONL of calib.synthetic / calib.mix) get the same treatment through
`check_output_file` and `staged_file` / `write_jsonl`: a temporary file beside the target,
`os.replace`d onto it at the end.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from calib.config import CalibError

logger = logging.getLogger(__name__)


def check_output_dir(save_directory: str | Path, overwrite: bool) -> Path:
    """The resolved target; CalibError if it is a file, or a non-empty directory without `overwrite`."""
    target = Path(save_directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise CalibError(f"--save_directory: {str(target)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CalibError(f"--save_directory: {str(target)!r} exists and is not empty; "
                         f"pass --overwrite to replace its content")
    return target


@contextmanager
def staged_output(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `target`; on normal exit it replaces `target`, on an
    exception it is deleted and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, target)


def _publish(staging: Path, target: Path) -> None:
    """Move `staging` onto `target`; an existing `target` is moved aside first and then deleted."""
    previous = None
    if target.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, previous / "content")
    try:
        os.replace(staging, target)
    except OSError:
        if previous is not None:                      # put the old content back
            os.replace(previous / "content", target)
            shutil.rmtree(previous, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    logger.info("wrote %s", target)


def check_output_file(path: str | Path, overwrite: bool, option: str = "--output") -> Path:
    """The resolved target file; CalibError if it is a directory, or exists without `overwrite`."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise CalibError(f"{option}: {str(target)!r} is a directory; give a .jsonl file path")
    if target.exists() and not overwrite:
        raise CalibError(f"{option}: {str(target)!r} exists; pass --overwrite to replace it")
    return target


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary file beside `target`; on normal exit it replaces `target`
    (os.replace), on an exception it is deleted and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    try:
        os.replace(staging, target)
    except OSError:
        staging.unlink(missing_ok=True)
        raise
    logger.info("wrote %s", target)


def write_jsonl(target: Path, records: Iterable[dict]) -> None:
    """One JSON line per record, published onto `target` only once all are written (staged_file)."""
    with staged_file(target) as staging, staging.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
