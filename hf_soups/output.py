"""Writing model folders safely: build in a temporary folder, rename into place when complete.

Inputs are read-only: an output that is, contains or lies inside an input folder, the Hub cache
or the current folder is refused before any work, whatever ``overwrite`` says. What a killed run
leaves beside an output (its temporary folder, or the previous output it was replacing) is named
after the run's process id and removed by the next run writing there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_soups.errors import OutputExistsError, OutputOverlapsInputError

logger = logging.getLogger(__name__)

_TEMPORARY_MARK = ".tmp-"
_REPLACED_MARK = ".old-"
# ".<target name><_TEMPORARY_MARK><pid>-<8 hex digits>", as atomic_output_dir names them.
_TEMPORARY_NAME = re.compile(rf"\.(.+){re.escape(_TEMPORARY_MARK)}\d+-[0-9a-f]{{8}}")


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_leftovers(target: Path) -> None:
    """Remove what killed runs left beside ``target``: their temporary folders and the
    previous outputs they had moved aside, both named ``.<name><mark><pid>-<random>``."""
    for mark in (_TEMPORARY_MARK, _REPLACED_MARK):
        prefix = f".{target.name}{mark}"
        for leftover in target.parent.glob(f"{prefix}*"):
            pid = leftover.name.removeprefix(prefix).split("-", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                logger.info("Removing %s, left by an interrupted run", leftover)
                _remove(leftover)


def _overlap(output: Path, folder: Path) -> str | None:
    """How ``output`` (resolved) touches ``folder`` (resolved), if it does."""
    if output == folder:
        return "is"
    if output in folder.parents:
        return "contains"
    if folder in output.parents:
        return "lies inside"
    return None


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_not_an_input(target: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output that is, contains or lies inside one of the ``inputs`` folders (those
    that exist locally; Hub ids are skipped), the Hub cache, or the current folder.

    Symlinks are followed, so a link to an input is that input.

    Raises:
        OutputOverlapsInputError: naming the output and what it touches.
    """
    output = Path(target).resolve()
    local = [Path(source).expanduser() for source in inputs]
    protected = [(folder, "input") for folder in local if folder.exists()]
    protected += [(_hub_cache(), "the Hub cache"), (Path.cwd(), "the current folder")]
    for folder, what in protected:
        relation = _overlap(output, folder.resolve())
        if relation is None or (relation == "lies inside" and what == "the current folder"):
            continue
        culprit = what if what != "input" else f"the input {folder}"
        why = (
            "replacing it would pull the folder out from under this process"
            if what == "the current folder"
            else "inputs are never written to, even with overwrite"
        )
        raise OutputOverlapsInputError(
            f"{target}: the output {relation} {culprit}; {why}; choose another folder"
        )


def check_output_dir(
    target: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Refuse an output that touches an input (see :func:`check_not_an_input`), and an existing
    non-empty ``target`` unless ``overwrite``; return ``target`` as a Path."""
    check_not_an_input(target, inputs)
    target = Path(target)
    if _is_nonempty(target) and not overwrite:
        raise OutputExistsError(
            f"{target}: already exists and is not empty; choose another folder or overwrite it "
            "explicitly (overwrite=True, --overwrite)"
        )
    return target


@contextmanager
def atomic_output_dir(
    target: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that becomes ``target`` on success.

    On any error (Ctrl-C included) the temporary folder is removed and ``target`` is left as it
    was, so a failed or interrupted run never leaves a half-written model behind. A non-empty
    ``target`` is refused unless ``overwrite=True``, and is then replaced only once the new
    folder is complete. An output touching one of ``inputs`` (folders the output is made from),
    the Hub cache or the current folder is always refused. Leftovers of killed runs beside
    ``target`` are removed first.
    """
    check_output_dir(target, overwrite, inputs=inputs)
    # Absolute, so that "out/.." or a trailing "." still names a folder with a parent.
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_leftovers(target)
    temporary = target.parent / f".{target.name}{_TEMPORARY_MARK}{_unique()}"
    # Not tempfile.mkdtemp: its mode 0o700 would stay on the finished folder; mkdir honours umask.
    temporary.mkdir()
    try:
        yield temporary
        check_output_dir(target, overwrite)  # something may have appeared meanwhile
        if target.exists() or target.is_symlink():
            trash = target.with_name(f".{target.name}{_REPLACED_MARK}{_unique()}")
            target.rename(trash)
            temporary.rename(target)
            _remove(trash)
        else:
            temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def final_name(folder: str | os.PathLike) -> str:
    """The name ``folder`` has once :func:`atomic_output_dir` moves it into place: its own name,
    or, for one of the temporary folders it yields (nested ones too), its target's."""
    return final_path(Path(folder).resolve()).name


def final_path(path: str | os.PathLike) -> Path:
    """``path`` as it will read once every :func:`atomic_output_dir` on it has moved its folder
    into place: what a log line names, rather than a temporary folder that is gone by the time
    the user reads it."""
    parts = []
    for part in Path(path).parts:
        while (found := _TEMPORARY_NAME.fullmatch(part)) is not None:
            part = found.group(1)
        parts.append(part)
    return Path(*parts)


def _unique() -> str:
    # The process id lets the next run tell a leftover of a dead run from a run in progress.
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
