"""Files and processes around a Trainer run: checkpoint folders, atomic writes, barriers."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_soups.errors import HfSoupsError
from hf_soups.output import atomic_output_dir


def distributed_world_size() -> int:
    """Number of processes in the default process group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def wait_for_everyone() -> None:
    """Barrier across processes, so no rank reads a folder the main process is still writing."""
    if distributed_world_size() > 1:
        dist.barrier()


def checkpoint_dir(args: TrainingArguments, step: int) -> Path:
    """The folder the Trainer writes its checkpoint of ``step`` into."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def write_json_atomic(path: Path, content: dict) -> None:
    """Write ``content`` as JSON to ``path`` through a temporary file and an atomic rename."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def save_model_folder(
    model: torch.nn.Module,
    target: Path,
    *,
    processing_class: Any = None,
    extra_files: Mapping[str, dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and its processor/tokenizer) with ``save_pretrained`` into ``target``.

    The folder is built beside ``target`` and renamed into place only when complete.
    ``extra_files`` maps file names to JSON content written alongside the weights.
    """
    with atomic_output_dir(target, overwrite=overwrite) as temporary:
        model.save_pretrained(temporary)
        if processing_class is not None:
            processing_class.save_pretrained(temporary)
        for name, content in (extra_files or {}).items():
            (temporary / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return target


def require_save_pretrained(model: torch.nn.Module, argument: str) -> None:
    """Fail before training when a folder is asked for and ``model`` cannot write one."""
    if not callable(getattr(model, "save_pretrained", None)):
        raise HfSoupsError(
            f"{argument} asks for a model folder, but {type(model).__name__} has no "
            "save_pretrained; use a transformers (or PEFT) model, or leave it unset"
        )
