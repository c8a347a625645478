"""Opening the files of a checkpoint folder without trusting them.

A checkpoint folder is input from anyone: its shard index can name any path on the machine, its
files can be symlinks to anywhere, FIFOs or devices, and its JSON can be nested deep enough to
crash a parser. So hf_soups opens a file of a folder only when

- its path resolves inside the folder, or, for a snapshot of the Hugging Face Hub cache, inside
  the repository's blob store (``models--org--name/blobs``), where the snapshot's symlinks point;
- it is a regular file (checked on the open descriptor, so a FIFO cannot block the open).

Nothing of a refused file is read, and no error message quotes a file's bytes. A merged folder
takes from its template only the known model files of :data:`COPIED_FILES`, by content.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from hf_soups.errors import CorruptedCheckpointError

logger = logging.getLogger(__name__)

MAX_JSON_DEPTH = 127
"""Deepest nesting of arrays and objects accepted in any JSON file of a checkpoint: serde_json's
limit, so a safetensors header is refused here exactly when ``safetensors`` refuses it."""

MAX_JSON_BYTES = 100_000_000
"""Largest JSON file read (the cap safetensors puts on its header): configs, processor files and
shard indexes are kilobytes."""

# Hub cache layout: <cache>/models--org--name/{blobs/<hash>, snapshots/<commit>/<file> -> blobs}.
_HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def readable_roots(folder: Path) -> tuple[Path, ...]:
    """The folders whose files a checkpoint in ``folder`` may use: the folder itself, plus the
    repository's blob store when ``folder`` is (inside) a Hub cache snapshot."""
    resolved = Path(os.path.realpath(folder))
    roots = [resolved]
    for snapshot in (resolved, *resolved.parents):
        repo = snapshot.parent.parent
        if snapshot.parent.name == "snapshots" and repo.name.startswith(_HUB_REPO_PREFIXES):
            if (repo / "blobs").is_dir():
                roots.append(repo / "blobs")
            break
    return tuple(roots)


def resolves_inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path``, with every symlink followed, lies inside one of ``roots``."""
    resolved = Path(os.path.realpath(path))
    return any(resolved.is_relative_to(root) for root in roots)


def outside_error(what: str) -> CorruptedCheckpointError:
    """The error for ``what`` (a file, an index entry) resolving outside its checkpoint folder."""
    return CorruptedCheckpointError(
        f"{what} resolves outside the checkpoint folder; symlinks are followed only within it "
        "(or from a Hub cache snapshot into its blobs): copy the file in instead"
    )


def is_relative_name(name: str) -> bool:
    """Whether ``name`` (a file name read from a checkpoint, such as a shard index entry) is a
    relative path that stays below its folder: not absolute, no ``..``, no NUL byte."""
    if not name or "\0" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


# O_NONBLOCK and O_CLOEXEC are POSIX, O_BINARY Windows (no newline translation): each where known.
_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file.

    The open does not block (``O_NONBLOCK``: a FIFO would otherwise wait for a writer) and the
    kind of file is checked on the open descriptor, so nothing can be swapped in between.

    Raises:
        CorruptedCheckpointError: when ``path`` is missing (a broken symlink, say), a symlink
            loop, a folder, FIFO, socket or device.
    """
    try:
        descriptor = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise CorruptedCheckpointError(f"{path}: missing (a broken symlink?)") from None
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise CorruptedCheckpointError(f"{path}: a symlink loop") from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise CorruptedCheckpointError(f"{path}: not a regular file")
    except BaseException:
        os.close(descriptor)
        raise
    # O_NONBLOCK changes nothing for a regular file's reads.
    return os.fdopen(descriptor, "rb")


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a number is 0, ``[[]]`` 2)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_json_depth(depth: int, source: object) -> None:
    """Refuse JSON nested deeper than :data:`MAX_JSON_DEPTH`.

    Raises:
        CorruptedCheckpointError: naming ``source``.
    """
    if depth > MAX_JSON_DEPTH:
        raise CorruptedCheckpointError(
            f"{source}: JSON nested {depth} deep, more than the {MAX_JSON_DEPTH} allowed"
        )


def too_deep(source: object) -> CorruptedCheckpointError:
    """The error for JSON so deep that Python's parser gave up (``RecursionError``)."""
    return CorruptedCheckpointError(f"{source}: JSON nested more than {MAX_JSON_DEPTH} deep")


def read_json_object(file: Path, roots: Sequence[Path]) -> dict[str, Any]:
    """Read a JSON object (config, processor or shard index file) of a checkpoint folder.

    Raises:
        CorruptedCheckpointError: naming ``file`` when it resolves outside ``roots``, is not a
            regular file, is larger than :data:`MAX_JSON_BYTES`, or is not a JSON object.
    """
    if not resolves_inside(file, roots):
        raise outside_error(f"{file}: a symlink that")
    with open_regular(file) as handle:
        raw = handle.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CorruptedCheckpointError(f"{file}: larger than {MAX_JSON_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorruptedCheckpointError(f"{file}: not UTF-8 text (byte {error.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep(file) from None
    except ValueError as error:
        raise CorruptedCheckpointError(f"{file}: invalid JSON ({error})") from None
    check_json_depth(json_depth(value), file)
    if not isinstance(value, dict):
        raise CorruptedCheckpointError(f"{file}: not a JSON object")
    return value


COPIED_FILES = frozenset(
    {
        # configs
        "config.json",
        "generation_config.json",
        "open_clip_config.json",
        # image, video and multimodal processors, feature extractors
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        # tokenizers and chat templates
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.model",
        "chat_template.json",
        "chat_template.jinja",
    }
)
"""The files a merged folder takes from its first ingredient, besides the merged weights. Only
these: other weight formats (ONNX, GGUF, OpenVINO, TensorFlow, Flax, pickles) would be weights
left unmerged, and any other file may be private (notes, credentials, training state)."""


def copy_extra_files(source: Path, destination: Path, *, exclude: Sequence[str] = ()) -> None:
    """Copy the config, processor and tokenizer files of :data:`COPIED_FILES` found in
    ``source`` into ``destination``, but the ``exclude`` names (the other format's config, for a
    repo holding two formats).

    What is copied is a regular file's content, never a link: a file that resolves outside
    ``source`` (or, for a Hub cache snapshot, its blob store) or is not a regular file is skipped
    with a warning.
    """
    roots = readable_roots(source)
    for name in sorted(COPIED_FILES):
        file = source / name
        if name in exclude or not os.path.lexists(file):
            continue
        if not resolves_inside(file, roots):
            logger.warning("Not copying %s: a symlink that resolves outside %s", file, source)
            continue
        try:
            handle = open_regular(file)
        except (CorruptedCheckpointError, OSError) as error:
            logger.warning("Not copying %s: %s", file, error)
            continue
        with handle, open(destination / name, "wb") as copy:
            shutil.copyfileobj(handle, copy)
