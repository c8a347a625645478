"""Ingredients: one checkpoint each, indexed lazily from its safetensors headers.

An :class:`Ingredient` knows where a checkpoint lives, which tensors it holds (name -> file,
dtype, shape, byte range) and its config, without reading any weights. Headers are validated and
tensors read by :mod:`hf_soups.safetensors_io`; every file is opened through
:mod:`hf_soups.checkpoint_files`, so a folder can only make hf_soups read regular files inside it
(or in the Hub cache's blob store its snapshot links to).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hf_soups.checkpoint_files import (
    is_relative_name,
    open_regular,
    outside_error,
    read_json_object,
    readable_roots,
    resolves_inside,
)
from hf_soups.errors import (
    CorruptedCheckpointError,
    IncompatibleIngredientsError,
    UnsafeCheckpointError,
)
from hf_soups.pruning.mask_file import MASK_FILE
from hf_soups.recipe.schema import Source
from hf_soups.safetensors_io import (  # noqa: F401 - re-exported: they were defined here
    SAFETENSORS_DTYPES,
    TensorInfo,
    read_safetensors_header,
    read_tensor,
)

if TYPE_CHECKING:
    from hf_soups.models.families import ModelFamily

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INGREDIENT_METADATA_FILE = "ingredient.json"


def _weights_group(file_name: str) -> str:
    # model-00001-of-00003.safetensors and model.safetensors both belong to group "model".
    stem = file_name.removesuffix(".safetensors")
    parts = stem.rsplit("-of-", 1)
    if len(parts) == 2 and parts[1].isdigit():
        stem = parts[0].rsplit("-", 1)[0]
    return stem


def _read_weight_map(index_file: Path, roots: tuple[Path, ...]) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> shard file name, checked by type."""
    weight_map = read_json_object(index_file, roots).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptedCheckpointError(
            f"{index_file}: unreadable shard index (weight_map is "
            f"{'missing' if weight_map is None else 'not a JSON object'})"
        )
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str):
            raise CorruptedCheckpointError(
                f"{index_file}: tensor {name!r} maps to {type(file_name).__name__} "
                f"{json.dumps(file_name)[:40]}, not a shard file name"
            )
    return weight_map


def _check_shard(
    folder: Path, roots: tuple[Path, ...], index_file: Path, name: str, file_name: str
) -> None:
    """Refuse the shard an index entry names unless it lies inside the checkpoint folder."""
    where = f"{index_file}: shard {file_name!r} (holding tensor {name!r})"
    if not is_relative_name(file_name):
        raise CorruptedCheckpointError(f"{where} is not a file name inside the checkpoint folder")
    shard = folder / file_name
    if not resolves_inside(shard, roots):
        raise outside_error(where)
    if not shard.exists():
        raise CorruptedCheckpointError(f"{where} is missing")


def index_folder(folder: Path, groups: Collection[str] | None = None) -> dict[str, TensorInfo]:
    """Index every safetensors weights file at the top of ``folder`` (only those of the weight
    `groups` when given: a repo holding two formats is read in one).

    ``*.safetensors.index.json`` files are honoured: every tensor they list must be in the file
    they name, a file inside the folder, and every tensor of that file must be listed. Files that
    no index mentions are indexed on their own (open_clip keeps ``open_clip_model.safetensors``;
    hf_soups stores classification heads beside it). Symlinks are followed only when they resolve
    inside the folder (or, for a Hub cache snapshot, into its blob store).

    Raises:
        CorruptedCheckpointError: naming the file (and the index entry or tensor) at fault.
    """
    roots = readable_roots(folder)
    index: dict[str, TensorInfo] = {}
    indexed_files: set[Path] = set()
    for index_file in sorted(folder.glob("*.safetensors.index.json")):
        group = index_file.name.removesuffix(".safetensors.index.json")
        if groups is not None and group not in groups:
            continue
        headers: dict[Path, dict[str, TensorInfo]] = {}
        listed: dict[Path, set[str]] = {}
        for name, file_name in _read_weight_map(index_file, roots).items():
            # ./model.safetensors and model.safetensors are one shard: Path drops the ".".
            shard = folder / file_name
            if shard not in headers:
                _check_shard(folder, roots, index_file, name, file_name)
                headers[shard] = read_safetensors_header(shard, group)
            if name not in headers[shard]:
                raise CorruptedCheckpointError(
                    f"{index_file}: tensor {name!r} is listed in {file_name!r} but not stored there"
                )
            index[name] = headers[shard][name]
            listed.setdefault(shard, set()).add(name)
        for shard, header in headers.items():
            unlisted = sorted(header.keys() - listed[shard])
            if unlisted:
                raise CorruptedCheckpointError(
                    f"{index_file}: shard {shard.name!r} holds tensor {unlisted[0]!r}, which the "
                    "index does not list there"
                )
        indexed_files.update(headers)
    for file in sorted(folder.glob("*.safetensors")):
        if file.name == MASK_FILE:  # a pruning mask beside the weights, not weights
            continue
        if file in indexed_files or (
            groups is not None and _weights_group(file.name) not in groups
        ):
            continue
        if not resolves_inside(file, roots):
            raise outside_error(f"{file}: a symlink that")
        for name, info in read_safetensors_header(file, _weights_group(file.name)).items():
            if name in index:
                raise CorruptedCheckpointError(
                    f"{folder}: tensor {name!r} is stored twice ({index[name].file.name} and "
                    f"{file.name})"
                )
            index[name] = info
    return index


@dataclass
class Ingredient:
    """One checkpoint of a soup: a local folder of safetensors weights and its config.

    Build one with :meth:`from_source` (a local folder or a Hub repo id such as
    ``"org/name@revision"``); nothing is read beyond the safetensors headers until a tensor is
    asked for.
    """

    source: str
    path: Path
    revision: str | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict, repr=False)
    config: dict = field(default_factory=dict, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)
    family: ModelFamily | None = field(default=None, repr=False)
    """The model family (layout) read from the folder; None for a folder without config."""
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        allow_pickle: bool = False,
        weights_format: str | None = None,
    ) -> Ingredient:
        """Resolve ``source`` (local folder, or Hub ``org/name[@revision]``) and index it.

        Hub sources go through ``huggingface_hub.snapshot_download`` (cache and offline mode
        honoured) and fetch only the small config/processor files and the weights of the
        checkpoint's family, in safetensors (``tf_model.h5``, ``flax_model.msgpack`` are never
        fetched). Pickle checkpoints (``.bin``/``.pt``) are refused unless ``allow_pickle=True``,
        and are then loaded with ``torch.load(weights_only=True)``. ``weights_format``
        (``"transformers"`` or ``"open_clip"``) chooses the format of repos that hold both (the
        laion CLIP repos); the default is transformers, logged once.
        """
        from hf_soups.hub import resolve_source

        path, resolved_revision = resolve_source(
            str(source),
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_pickle=allow_pickle,
            weights_format=weights_format,
        )
        return cls.from_folder(
            path,
            source=str(source),
            revision=resolved_revision,
            allow_pickle=allow_pickle,
            weights_format=weights_format,
        )

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        source: str | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        weights_format: str | None = None,
    ) -> Ingredient:
        """Index a local folder that is already on disk (``weights_format``: as in
        :meth:`from_source`)."""
        from hf_soups.models.families import CheckpointFiles, family_of

        path = Path(path)
        files = CheckpointFiles.read(path)
        family = family_of(files, weights_format)
        # Only a repo holding two formats is narrowed to its family's files; elsewhere every
        # weights file belongs to the one checkpoint (and a stray one is an error, not skipped).
        narrowed = files.holds_both_formats and family is not None
        tensors = index_folder(path, family.weight_groups if narrowed else None)
        pickled = None
        if not tensors:
            pickle_files = sorted(
                path / name
                for name in files.names
                if name.endswith(PICKLE_SUFFIXES)
                and (not narrowed or any(fnmatch(name, p) for p in family.pickle_files))
            )
            if not pickle_files:
                raise CorruptedCheckpointError(f"{path}: no safetensors weights found")
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{source or path}: only pickle weights ({', '.join(p.name for p in pickle_files)})."
                    " Unpickling can run arbitrary code; convert the checkpoint to safetensors, or "
                    "pass allow_pickle=True (loads with torch.load(weights_only=True))"
                )
            pickled, tensors = _load_pickles(pickle_files)
        config = family.config_of(files) if family is not None else {}
        metadata_file = path / INGREDIENT_METADATA_FILE
        metadata = _read_json(metadata_file) if metadata_file.is_file() else {}
        return cls(
            source=source or str(path),
            path=path,
            revision=revision,
            tensors=tensors,
            config=config,
            metadata=metadata,
            family=family,
            _pickled=pickled,
        )

    @property
    def foreign_files(self) -> tuple[str, ...]:
        """Files of a format this ingredient was not read in (see ``weights_format``)."""
        return self.family.foreign_files() if self.family is not None else ()

    @property
    def pickled(self) -> bool:
        """Whether the weights were read from pickle files (behind ``allow_pickle``)."""
        return self._pickled is not None

    @property
    def name(self) -> str:
        """A short display name: the source with its revision when pinned."""
        return self.source if self.revision is None else f"{self.source}@{self.revision[:10]}"

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` as stored (dtype and shape) into a fresh CPU tensor, or into
        ``out`` (same dtype and size) to reuse its memory."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.name}: no tensor {name!r}") from None
        if self._pickled is not None:
            tensor = self._pickled[name]
            return tensor.clone() if out is None else out.copy_(tensor.view_as(out))
        return read_tensor(info, name, out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, keyed as on disk. Reads the whole checkpoint into memory."""
        return {name: self.read(name) for name in self.tensors}

    def record(self) -> Source:
        """What a recipe stores about this ingredient to reproduce a merge."""
        return Source(source=self.source, revision=self.revision)


def _read_json(file: Path) -> dict:
    return read_json_object(file, readable_roots(file.parent))


def _load_pickles(files: Sequence[Path]) -> tuple[dict[str, torch.Tensor], dict[str, TensorInfo]]:
    state: dict[str, torch.Tensor] = {}
    index: dict[str, TensorInfo] = {}
    for file in files:
        if not resolves_inside(file, readable_roots(file.parent)):
            raise outside_error(f"{file}: a symlink that")
        with open_regular(file):  # before torch.load, which would block on a FIFO
            pass
        logger.warning("Loading pickle checkpoint %s with torch.load(weights_only=True)", file)
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise CorruptedCheckpointError(f"{file}: cannot be loaded safely ({error})") from error
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise CorruptedCheckpointError(f"{file}: does not hold a state dict")
        for name, tensor in loaded.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            state[name] = tensor
            # transformers names pickles pytorch_model*.bin but safetensors model*.safetensors.
            group = "model" if file.stem.startswith("pytorch_model") else file.stem
            index[name] = TensorInfo(
                file, tensor.dtype, tuple(tensor.shape), 0, tensor.nbytes, group
            )
    return state, index


def _architecture(ingredient: Ingredient) -> tuple:
    if ingredient.family is None:
        return (None,)
    return ingredient.family.architecture_key(ingredient.config)


def _describe(architecture: tuple) -> str:
    """An architecture key in words: ``a vit checkpoint (ViTForImageClassification)``."""
    if architecture == (None,):
        return "of no known layout (no config the families recognise)"
    family, *rest = architecture
    if family == "open_clip":
        return "an open_clip checkpoint of another model config"
    model_type, classes = (rest + [None, ()])[:2]
    return f"a {model_type or family} checkpoint ({', '.join(classes) or 'no architectures'})"


def check_distinct(ingredients: Iterable[Ingredient]) -> None:
    """Refuse a checkpoint given twice, by name or by folder (``b`` and ``b/../b``): it would
    count twice in every average, where a weight says what was meant.

    Raises:
        IncompatibleIngredientsError: naming both sources.
    """
    seen: dict[object, Ingredient] = {}
    for ingredient in ingredients:
        for key in (ingredient.name, ingredient.path.resolve()):
            earlier = seen.setdefault(key, ingredient)
            if earlier is not ingredient:
                raise IncompatibleIngredientsError(
                    f"{ingredient.name}: the same checkpoint as {earlier.name} (give it once; "
                    "weights, --weights on the command line, weigh a model more)"
                )


def check_compatible(ingredients: Iterable[Ingredient]) -> None:
    """Check that ingredients can be merged: same architecture, tensor names, shapes and kinds.

    Floating tensors may differ in precision (they are accumulated in float32); integer and
    boolean buffers must match in dtype, since they are copied rather than averaged.

    Raises:
        IncompatibleIngredientsError: naming the ingredient and the tensor at fault.
    """
    ingredients = list(ingredients)
    if not ingredients:
        raise IncompatibleIngredientsError("no ingredients given")
    reference = ingredients[0]
    reference_architecture = _architecture(reference)
    for other in ingredients[1:]:
        architecture = _architecture(other)
        if architecture != reference_architecture:
            raise IncompatibleIngredientsError(
                f"different architectures: {other.name} is {_describe(architecture)} but "
                f"{reference.name} is {_describe(reference_architecture)}"
            )
        missing = reference.tensors.keys() - other.tensors.keys()
        if missing:
            raise IncompatibleIngredientsError(
                f"{other.name} lacks tensor {sorted(missing)[0]!r} of {reference.name}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = other.tensors.keys() - reference.tensors.keys()
        if extra:
            raise IncompatibleIngredientsError(
                f"{other.name} has tensor {sorted(extra)[0]!r} that {reference.name} lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for name, info in reference.tensors.items():
            other_info = other.tensors[name]
            if other_info.shape != info.shape:
                raise IncompatibleIngredientsError(
                    f"tensor {name!r}: shape {list(other_info.shape)} in {other.name} but "
                    f"{list(info.shape)} in {reference.name}"
                )
            if info.dtype.is_floating_point != other_info.dtype.is_floating_point or (
                not info.dtype.is_floating_point and info.dtype != other_info.dtype
            ):
                raise IncompatibleIngredientsError(
                    f"tensor {name!r}: dtype {other_info.dtype} in {other.name} but "
                    f"{info.dtype} in {reference.name}"
                )
