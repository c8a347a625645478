"""The typed recipe: what ``soup.json`` records, and what replays a model folder bit for bit.

Every path that writes a model folder (merge, soups, WiSE-FT, PAINT) writes one :class:`Recipe`;
model cards and ``hf-soups card`` render from it alone, and :func:`hf_soups.recipe.replay`
rebuilds the weights from it. The merge itself is fully described by ``method``, ``parameters``,
``ingredients``, ``base`` and ``dtype``; the rest records how the merge was chosen and scored.

``schema_version`` is bumped whenever a field changes meaning; older files are refused with a
clear error rather than misread.
"""

from __future__ import annotations

import copy
import json
import os
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePath
from typing import Any

from hf_soups.errors import RecipeError
from hf_soups.recipe.typed import RECORD_NULL, from_json, to_json

__all__ = [
    "RECIPE_FILE",
    "SCHEMA_VERSION",
    "GreedyStep",
    "PatchRecord",
    "PruningRecipe",
    "PruningRecord",
    "Recipe",
    "Score",
    "SoupRecord",
    "Source",
    "environment",
    "score_table",
]

RECIPE_FILE = "soup.json"
SCHEMA_VERSION = 1
# JSON nested deeper than this is not a recipe (and would exhaust the parser's recursion).
_MAX_RECIPE_BYTES = 64 * 1024 * 1024


@dataclass
class Source:
    """One model a recipe names: a Hub id with its resolved commit, or a local folder.

    ``revision`` is the resolved commit of a Hub source and ``None`` for a local folder.
    ``recipe`` is the source's own recipe when it is itself a merge (a greedy soup used as the
    fine-tuned end of WiSE-FT), so a composed model keeps its whole history.
    """

    source: str
    revision: str | None = field(default=None, metadata=RECORD_NULL)
    name: str | None = None
    recipe: Recipe | None = None

    @property
    def display_name(self) -> str:
        """``name`` if recorded, else ``source`` or ``source@revision[:10]``."""
        if self.name:
            return self.name
        return self.source if self.revision is None else f"{self.source}@{self.revision[:10]}"

    @property
    def is_hub(self) -> bool:
        """Whether the source is a Hub repository (it then has a resolved revision)."""
        return self.revision is not None


@dataclass
class Score:
    """Scores of one model on one eval set, as :meth:`hf_soups.evaluation.EvalResult.to_dict`
    summarises them (a callable scorer records only ``{"score": value}`` metrics)."""

    metrics: dict[str, float]
    intervals: dict[str, list[float]] = field(default_factory=dict)
    n: int | None = None
    primary_metric: str | None = None
    confidence: float | None = None
    name: str | None = None
    model: str | None = None
    """For aliases such as ``"best individual"``: the model the scores belong to."""
    score: float | None = None
    """The primary metric's value, repeated for readers of the raw JSON."""

    def __post_init__(self) -> None:
        if not self.metrics:
            raise RecipeError("a score records no metrics")
        if self.primary_metric is None:
            self.primary_metric = next(iter(self.metrics))
        if self.primary_metric not in self.metrics:
            raise RecipeError(f"score: primary metric {self.primary_metric!r} is not recorded")
        self.score = self.metrics[self.primary_metric]

    @classmethod
    def of(cls, result: Any, value: float | None = None) -> Score:
        """From an ``EvalResult`` (its summary), or a bare ``value`` when ``result`` is None."""
        if result is None:
            return cls(metrics={"score": float(value)})
        return from_json(cls, result.to_dict())


@dataclass
class GreedyStep:
    """One candidate of a greedy soup: its own score, the soup's score with it, the verdict."""

    ingredient: str
    individual_score: float | None
    soup_score: float | None
    kept: bool
    reason: str = ""


@dataclass
class PruningRecipe:
    """How pruned ingredients were made, as the code that pruned them records it (the demo's
    Sparse Model Soups loop does): the scorer, the sparsity of each round and its retraining."""

    scorer: str
    sparsities: list[float]
    scope: str | None = None
    method: str | None = None
    copies_per_round: int | None = None
    soup: str | None = None
    """The soup rule of each round (``uniform`` or ``greedy``)."""
    retraining: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] | None = None
    """Per round: its sparsity, the copies kept in its soup and their held-out scores."""


@dataclass
class PruningRecord:
    """A sparse soup's mask (:meth:`hf_soups.pruning.SoupMask.to_record`): its rule, file and
    sparsity (overall and per tensor), and how the ingredients were pruned, when known."""

    masks: str
    mask_file: str
    sparsity: float
    sparsity_by_tensor: dict[str, float]
    recipe: PruningRecipe | None = None


@dataclass
class SoupRecord:
    """How a soup's merge was chosen: the soup recipe (uniform, greedy, learned, ...) and what
    its choice rested on. The merge it led to is the recipe's ``method`` and ``parameters``."""

    method: str
    citation: str | None = None
    name: str | None = None
    """Its key in the recipe's ``scores``; default ``"<method> soup"``."""
    weights: list[float] | None = None
    """One mixing weight per ingredient (the mean over tensors for per-tensor soups)."""
    metric: str | None = None
    maximize: bool | None = None
    held_out: str | None = None
    acceptance: dict[str, Any] | None = None
    candidates: list[Source] | None = None
    greedy_trace: list[GreedyStep] | None = None
    coefficients: dict[str, Any] | None = None
    pruning: PruningRecord | None = None
    """A sparse soup's mask and how its ingredients were pruned."""

    @property
    def display_name(self) -> str:
        return self.name or f"{self.method} soup"


@dataclass
class PatchRecord:
    """WiSE-FT or PAINT: the two ends, the rule that chose ``alpha`` and the whole sweep."""

    kind: str
    zero_shot: Source
    fine_tuned: Source
    chosen_alpha: float
    selection: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] | None = None
    chosen_scores: dict[str, Any] | None = None
    citation: str | None = None


@dataclass
class Recipe:
    """Everything ``soup.json`` records. See the module docstring for what replays."""

    method: str
    parameters: dict[str, Any]
    ingredients: list[Source]
    base: Source | None = field(default=None, metadata=RECORD_NULL)
    dtype: str | None = field(default=None, metadata=RECORD_NULL)
    citation: str | None = None
    schema_version: int = SCHEMA_VERSION
    library: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    soup: SoupRecord | None = None
    patch: PatchRecord | None = None
    task: dict[str, Any] | None = None
    """The zero-shot task (class names, templates, text model) the models were scored with."""
    scores: dict[str, dict[str, Score]] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: dict[str, Any] | None = None
    plots: list[str] = field(default_factory=list)
    eval_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    command: str | None = None
    model_name: str | None = None
    license: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise RecipeError(
                f"recipe schema version {self.schema_version} is not {SCHEMA_VERSION}, the one "
                f"this hf_soups reads; rebuild the folder or use the hf_soups that wrote it"
            )
        if not self.ingredients:
            raise RecipeError("recipe: 'ingredients' is empty")
        if not self.library:
            self.library = f"hf_soups {_version('hf_soups')}"
        if not self.environment:
            self.environment = environment()

    @property
    def name(self) -> str:
        """The name this model's scores are recorded under."""
        if self.model_name:
            return self.model_name
        if self.soup is not None:
            return self.soup.display_name
        if self.patch is not None:
            return f"{'PAINT' if self.patch.kind == 'paint' else 'WiSE-FT'} alpha={self.patch.chosen_alpha:g}"
        return f"{self.method} merge"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (fields left at ``None`` are omitted, but for revisions, base and
        dtype, whose ``null`` is meaningful)."""
        return to_json(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Read and type-check a recipe; :class:`~hf_soups.errors.RecipeError` names the field."""
        return from_json(cls, data, where)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/soup.json``."""
        path = Path(folder) / RECIPE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def public(self) -> Recipe:
        """A copy fit to publish: every local source and local eval-set dataset, and every name
        or text derived from them (score rows, greedy trace, comparisons), reduced to its
        folder's name; Hub ids are kept. Folder names that would collide keep as many parent
        folders as tell them apart."""
        data = self.to_dict()
        datasets = (info.get("dataset") for info in self.eval_sets.values())
        local_data = {d for d in datasets if isinstance(d, str) and d.startswith(("/", "~"))}
        short = _public_names(_local_sources(data) | local_data)
        return Recipe.from_dict(_replace_strings(data, short)) if short else copy.deepcopy(self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read ``soup.json`` (or the ``soup.json`` of a folder)."""
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"{path}: no such file or folder")
        if path.is_dir():
            path = path / RECIPE_FILE
        if not path.is_file():
            raise RecipeError(f"{path}: no recipe (written by hf_soups with every merged model)")
        if path.stat().st_size > _MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {path.stat().st_size} bytes is too large for a recipe")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise RecipeError(f"{path}: not valid JSON ({str(error)[:80]})") from None
        return cls.from_dict(data, where=str(path))


def score_table(raw: Any) -> dict[str, dict[str, Score]]:
    """Model name -> eval set -> :class:`Score`, from summaries shaped as
    ``EvalResult.to_dict()`` (how builders keep the scores they measure), or ``{"score": v}``
    for what a callable scorer returned."""
    if isinstance(raw, dict):
        raw = {
            model: {name: _bare_score(entry) for name, entry in per_set.items()}
            if isinstance(per_set, dict)
            else per_set
            for model, per_set in raw.items()
        }
    return from_json(dict[str, dict[str, Score]], raw, "scores")


def _bare_score(entry: Any) -> Any:
    # A callable scorer's value has no metric name: it is recorded as the metric "score".
    if isinstance(entry, dict) and "metrics" not in entry and "score" in entry:
        return {**entry, "metrics": {"score": entry["score"]}}
    return entry


def _local_sources(data: Any) -> set[str]:
    """The ``source`` of every record without a revision (a local folder), at any depth."""
    found: set[str] = set()
    if isinstance(data, dict):
        if isinstance(data.get("source"), str) and data.get("revision", None) is None:
            found.add(data["source"])
        for value in data.values():
            found |= _local_sources(value)
    elif isinstance(data, list):
        for value in data:
            found |= _local_sources(value)
    return found


def _public_names(paths: set[str]) -> dict[str, str]:
    """Local path -> the shortest trailing part of it (its folder name, unless two share it)
    that no other path shares; paths already a bare name are left out."""
    parts = {path: PurePath(path).parts for path in paths}
    names = {}
    for path, own in parts.items():
        for depth in range(1, len(own) + 1):
            tail = own[-depth:]
            if all(
                other[-depth:] != tail for other_path, other in parts.items() if other_path != path
            ):
                break
        name = PurePath(*tail).as_posix() if own else path
        if name != path:
            names[path] = name
    return names


def _replace_strings(data: Any, names: dict[str, str]) -> Any:
    """``data`` with every occurrence of a key of ``names`` in any string (keys included)
    replaced by its value, longest first (so ``/a/ft10`` is not read as ``/a/ft1`` + ``0``)."""
    if isinstance(data, str):
        for old in sorted(names, key=len, reverse=True):
            data = data.replace(old, names[old])
        return data
    if isinstance(data, dict):
        return {_replace_strings(key, names): _replace_strings(v, names) for key, v in data.items()}
    if isinstance(data, list):
        return [_replace_strings(item, names) for item in data]
    return data


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def environment() -> dict[str, str]:
    """Versions of what computed the weights, recorded for reproduction."""
    return {
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "safetensors", "transformers")},
    }
