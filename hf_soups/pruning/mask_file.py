"""The mask file saved beside a model: ``pruning_mask.safetensors``.

It holds one bool tensor (``True`` kept) per pruned tensor, keyed by the tensor's name *on disk*
(what ``save_pretrained`` writes, which transformers may rename from the in-memory name), so a
soup of model folders can read it against the stored weights without loading a model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hf_soups.checkpoint_files import outside_error, readable_roots, resolves_inside
from hf_soups.errors import CorruptedCheckpointError, HfSoupsError
from hf_soups.output import atomic_output_dir
from hf_soups.pruning.targets import prunable_parameters

MASK_FILE = "pruning_mask.safetensors"


def _markers(parameters: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    """One constant per parameter, distinct among parameters of one size: -2, -3, ... (negative
    integers no initialisation fills a tensor with), small enough to be exact in the
    parameter's dtype (bfloat16 tells integers apart only up to 256)."""
    counts: dict[int, int] = {}
    markers = {}
    for name in names:
        numel = parameters[name].numel()
        counts[numel] = counts.get(numel, 0) + 1
        marker = -1.0 - counts[numel]
        dtype = parameters[name].dtype
        if torch.tensor(marker, dtype=dtype).item() != marker:
            raise HfSoupsError(
                f"{name}: too many parameters of {numel} elements to tell apart in {dtype}; "
                "find the stored names from a float32 copy of the model"
            )
        markers[name] = marker
    return markers


def saved_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """In-memory parameter name -> the name ``save_pretrained`` stores it under.

    Read off a real save: each named parameter is filled with its own constant marker
    (distinct among parameters of one size), the model saved to a temporary folder and each
    stored tensor names the marker it holds; the parameters are restored afterwards. A model
    without ``save_pretrained`` is saved by the Trainer under its ``state_dict`` names, returned
    as they are.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        return {name: name for name in names}
    parameters = dict(model.named_parameters())
    backup = {name: parameters[name].detach().clone() for name in names}
    markers = _markers(parameters, names)
    try:
        with torch.no_grad():
            for name in names:
                parameters[name].fill_(markers[name])
        with tempfile.TemporaryDirectory() as scratch:
            model.save_pretrained(scratch)
            stored = {}
            for file in sorted(Path(scratch).glob("*.safetensors")):
                stored.update(load_file(file))
    finally:
        with torch.no_grad():
            for name in names:
                parameters[name].copy_(backup[name])
    by_marker = {}
    for disk_name, tensor in stored.items():
        if tensor.is_floating_point() and tensor.numel() > 0:
            first = tensor.flatten()[0].item()
            if first <= -2.0 and bool((tensor == first).all()):
                by_marker[tensor.numel(), first] = disk_name
    mapping = {name: by_marker.get((parameters[name].numel(), markers[name])) for name in names}
    lost = [name for name, disk_name in mapping.items() if disk_name is None]
    if lost:
        raise HfSoupsError(f"{type(model).__name__}: save_pretrained does not store {lost[0]!r}")
    return mapping


def write_mask_file(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    names: Mapping[str, str] | None = None,
) -> Path:
    """Write ``masks`` (in-memory names) into ``folder`` as :data:`MASK_FILE`, keyed by the
    on-disk names (``names``, a :func:`saved_names` mapping already computed, or computed now),
    through a temporary file and an atomic rename."""
    mapping = names if names is not None else saved_names(model, list(masks))
    tensors = {mapping[name]: mask.detach().to("cpu", torch.bool) for name, mask in masks.items()}
    target = Path(folder) / MASK_FILE
    temporary = target.with_name(f".{MASK_FILE}.tmp-{os.getpid()}")
    save_file(tensors, temporary, metadata={"format": "pt"})
    os.replace(temporary, target)
    return target


def save_pruned(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    processing_class=None,
) -> Path:
    """``save_pretrained`` the pruned model with its mask file beside the weights."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as work_dir:
        model.save_pretrained(work_dir)
        if processing_class is not None:
            processing_class.save_pretrained(work_dir)
        write_mask_file(model, masks, work_dir)
    return Path(out_dir)


def read_mask_file(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The masks stored in ``folder`` by on-disk tensor name, or ``None`` if it has none."""
    file = Path(folder) / MASK_FILE
    if not os.path.lexists(file):
        return None
    if not resolves_inside(file, readable_roots(Path(folder))):
        raise outside_error(f"{file}: a symlink that")
    with safe_open(file, framework="pt") as handle:
        masks = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    wrong = [name for name, mask in masks.items() if mask.dtype != torch.bool]
    if wrong:
        raise CorruptedCheckpointError(f"{file}: tensor {wrong[0]!r} is not a bool mask")
    return masks


def load_masks(
    model: nn.Module, folder: str | os.PathLike, *, names: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The mask file of ``folder`` keyed by ``model``'s in-memory parameter names (``names``: a
    :func:`saved_names` mapping already computed)."""
    stored = read_mask_file(folder)
    if stored is None:
        raise HfSoupsError(f"{folder}: no {MASK_FILE}")
    to_disk = (
        names
        if names is not None
        else saved_names(model, list(prunable_parameters(model, include_heads=True)))
    )
    to_memory = {disk_name: name for name, disk_name in to_disk.items()}
    unknown = sorted(set(stored) - set(to_memory))
    if unknown:
        raise CorruptedCheckpointError(
            f"{Path(folder) / MASK_FILE}: tensor {unknown[0]!r} is not a parameter of the model"
        )
    return {to_memory[disk_name]: mask for disk_name, mask in stored.items()}
