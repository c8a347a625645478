"""Writing model folders safely: build in a temporary folder, rename into place when complete."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_soups.errors import OutputExistsError

logger = logging.getLogger(__name__)

_TEMPORARY_MARK = ".tmp-"


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporary folders that a killed run left beside ``target``."""
    prefix = f".{target.name}{_TEMPORARY_MARK}"
    for leftover in target.parent.glob(f"{prefix}*"):
        pid = leftover.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            logger.info("Removing %s, left by an interrupted run", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def check_output_dir(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty ``target`` unless ``overwrite``; return it as a Path."""
    target = Path(target)
    if _is_nonempty(target) and not overwrite:
        raise OutputExistsError(
            f"{target}: already exists and is not empty; choose another folder or overwrite it "
            "explicitly (overwrite=True, --overwrite)"
        )
    return target


@contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that becomes ``target`` on success.

    On any error the temporary folder is removed and ``target`` is left as it was, so a failed
    or interrupted run never leaves a half-written model behind. A non-empty ``target`` is
    refused unless ``overwrite=True``, and is then replaced only once the new folder is complete.
    """
    target = check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary = target.parent / f".{target.name}{_TEMPORARY_MARK}{unique}"
    # Not tempfile.mkdtemp: its mode 0o700 would stay on the finished folder; mkdir honours umask.
    temporary.mkdir()
    try:
        yield temporary
        check_output_dir(target, overwrite)  # something may have appeared meanwhile
        if target.exists():
            trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(trash)
            temporary.rename(target)
            if trash.is_dir():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink()
        else:
            temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
