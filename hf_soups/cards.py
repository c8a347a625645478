"""Model cards for merged model folders, rendered from the recipe (``soup.json``) alone.

:func:`write_card` reads a folder's ``soup.json``, builds ``huggingface_hub`` metadata
(:class:`~huggingface_hub.ModelCardData`: ``base_model``, ``base_model_relation: merge``,
``library_name``, ``pipeline_tag``, tags, datasets, and a ``model-index`` entry for every score)
and renders the body from the templates in ``model_cards/`` (``soup.md`` for soups and other
merges, ``wise_ft.md`` for WiSE-FT and PAINT). ``hf-soups card DIR`` regenerates a card the same
way, so any merged folder can get its card back. The templates ship inside the package
(``hf_soups/model_cards`` is a symlink to the repository's ``model_cards/``; setuptools copies the
files into wheels) and are read with :mod:`importlib.resources`.

The recipe schema
-----------------
Written by :func:`hf_soups.merge.merge` (always present)::

    "library": "hf_soups 0.1.0",
    "method": "weighted_average" | "wise_ft" | "paint" | "task_arithmetic" | ...,
    "parameters": {...},          # {"weights": [...]} for a weighted average, {"alpha": a} ...
    "citation": str | null,       # the merge method's paper, used for methods not named below
    "ingredients": [{"source": str, "revision": str | null, "name"?: str}, ...],
    "base": {"source", "revision"} | null,
    "dtype": str | null,

A record's ``revision`` is the resolved commit of a Hub source and ``null`` for a local folder;
only Hub sources become ``base_model`` entries. Its display name is ``name`` if recorded, else
``Ingredient.name``'s rule: ``source`` or ``source@revision[:10]``.

Optional, written by the soup builder (:mod:`hf_soups.soup`)::

    "soup": {
        "method": "uniform" | "greedy" | "learned" | "learned_by_layer" | "weighted" | ...,
        "name"?: str,             # its key in "scores"; default "<method> soup"
        "weights": [...],         # aligned with "ingredients"
        "metric"?: str,           # the metric that selected it
        "held_out"?: str,         # the eval set that selected it
        "candidates"?: [record],  # every ingredient considered (greedy drops some)
        "greedy_trace"?: [{"ingredient": name, "individual_score"?: float,
                           "soup_score" | "score": float | null, "kept": bool, "reason"?: str}],
        ...                       # other details are shown in the recipe only
    },
    "scores": {model name: {eval set: score entry}},

Model names are the ingredients' display names, ``"ensemble"``, ``"best individual"``, soups
(``"uniform soup"``, ``"greedy soup"``, ...), ``"zero-shot"``, ``"fine-tuned"``... A score entry
is either :meth:`hf_soups.evaluation.EvalResult.to_dict` (``{"metrics": {m: v}, "intervals":
{m: [lo, hi]}, "n": int, "primary_metric": m, ...}``), a flat ``{m: v, "interval": [lo, hi],
"n": int}`` (the interval belongs to the primary metric), or ``{"score": v}``.

Optional, written by WiSE-FT / PAINT (:mod:`hf_soups.patching`; ``method`` is ``"wise_ft"``,
the interpolation, and ``kind`` tells WiSE-FT from PAINT)::

    "kind": "wise_ft" | "paint",
    "zero_shot": record, "fine_tuned": record,      # the two ends (alpha = 0 and 1)
    "chosen_alpha": a,                               # default: parameters["alpha"]
    "selection": {"description": str, ...},          # the rule that chose alpha
    "sweep": {"alphas": [a, ...],
              "results": {eval set: [score entry per alpha]},   # or, without intervals,
              "scores": {eval set: [value per alpha]}}
          or [{"alpha": a, "scores": {eval set: score entry}}],
    "scores": {"WiSE-FT alpha=a" | "zero-shot" | "fine-tuned" | ...: {eval set: entry}},

Optional, any writer::

    "plots": ["wise_ft_sweep.png"],                  # files in the folder, linked in the card
    "datasets": ["org/dataset"],                     # Hub dataset ids, for the metadata
    "eval_sets": {name: {"dataset": id, "config": str, "split": str, "revision": str}},
    "comparisons": [PairedComparison.to_dict()],     # their verdicts are listed under results
    "command": "hf-soups ...",                       # how the folder was made, shown verbatim
    "model_name", "license", "pipeline_tag", "library_name", "tags", "base_model": overrides.

Everything but ``ingredients`` is optional: a card renders from whatever the recipe holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hf_soups.errors import CorruptedCheckpointError
from hf_soups.merge import RECIPE_FILE

logger = logging.getLogger(__name__)

__all__ = ["CARD_FILE", "card_data", "render_card", "write_card"]

CARD_FILE = "README.md"
PATCHING_METHODS = ("wise_ft", "paint")
_PLOT_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")

_SOUPS_PAPER = (
    'Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves '
    'accuracy without increasing inference time", ICML 2022, '
    "[arXiv:2203.05482](https://arxiv.org/abs/2203.05482)"
)
_WISE_FT_PAPER = (
    'Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, '
    "[arXiv:2109.01903](https://arxiv.org/abs/2109.01903)"
)
_PAINT_PAPER = (
    'Ilharco et al., "Patching open-vocabulary models by interpolating weights", NeurIPS 2022, '
    "[arXiv:2208.05592](https://arxiv.org/abs/2208.05592)"
)
_BIBTEX = {
    "soups": """@inproceedings{wortsman2022soups,
  title = {Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time},
  author = {Wortsman, Mitchell and Ilharco, Gabriel and Gadre, Samir Yitzhak and Roelofs, Rebecca and Gontijo-Lopes, Raphael and Morcos, Ari S. and Namkoong, Hongseok and Farhadi, Ali and Carmon, Yair and Kornblith, Simon and Schmidt, Ludwig},
  booktitle = {International Conference on Machine Learning (ICML)},
  year = {2022},
  note = {arXiv:2203.05482}
}""",
    "wise_ft": """@inproceedings{wortsman2022robust,
  title = {Robust fine-tuning of zero-shot models},
  author = {Wortsman, Mitchell and Ilharco, Gabriel and Kim, Jong Wook and Li, Mike and Kornblith, Simon and Roelofs, Rebecca and Gontijo-Lopes, Raphael and Hajishirzi, Hannaneh and Farhadi, Ali and Namkoong, Hongseok and Schmidt, Ludwig},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2022},
  note = {arXiv:2109.01903}
}""",
    "paint": """@inproceedings{ilharco2022patching,
  title = {Patching open-vocabulary models by interpolating weights},
  author = {Ilharco, Gabriel and Wortsman, Mitchell and Gadre, Samir Yitzhak and Song, Shuran and Hajishirzi, Hannaneh and Kornblith, Simon and Farhadi, Ali and Schmidt, Ludwig},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year = {2022},
  note = {arXiv:2208.05592}
}""",
}
# Two sentences per method: what it does, and why it helps.
_SOUP_METHODS = {
    "uniform": (
        "A uniform soup averages the weights of models fine-tuned from the same pre-trained "
        "model with different hyperparameters, each with weight 1/N. Because such models lie in "
        "one low-error basin, the average is often more accurate and more robust to "
        "distribution shift than the best of them, at the inference cost of a single model"
    ),
    "greedy": (
        "A greedy soup sorts the fine-tuned models by their held-out score and adds each one to "
        "a uniform average only if the average's held-out score improves. It is never worse "
        "than the best single model on the held-out set and keeps the inference cost of one "
        "model"
    ),
    "learned": (
        "A learned soup fits one mixing weight per model by gradient descent on held-out data, "
        "then averages the models' weights with them. It can beat uniform and greedy soups but "
        "needs every model in memory at once"
    ),
    "learned_by_layer": (
        "A learned soup by layer fits one mixing weight per model and per tensor by gradient "
        "descent on held-out data. It is the most flexible soup and needs every model in memory "
        "at once"
    ),
    "weighted": (
        "A weighted soup averages the weights of models fine-tuned from the same pre-trained "
        "model with the mixing weights below. Models that share a pre-trained start can be "
        "averaged because they lie in one low-error basin"
    ),
}
_PATCH_METHODS = {
    "wise_ft": (
        "WiSE-FT interpolates the weights of a zero-shot model and of the same model fine-tuned "
        "on a target task, θ = (1 − α)·θ_zero-shot + α·θ_fine-tuned. Intermediate α keeps most "
        "of the fine-tuned accuracy while recovering the zero-shot model's robustness to "
        "distribution shift",
        _WISE_FT_PAPER,
    ),
    "paint": (
        "PAINT patches an open-vocabulary model by interpolating its weights with the weights "
        "fine-tuned on the tasks to patch, θ = (1 − α)·θ_zero-shot + α·θ_fine-tuned. α is "
        "chosen to gain accuracy on the patching tasks while keeping it on the tasks the model "
        "already supported",
        _PAINT_PAPER,
    ),
}


@dataclass(frozen=True)
class Score:
    """One measured value with its confidence interval and sample size, as recorded."""

    value: float
    interval: tuple[float, float] | None = None
    n: int | None = None


# -- reading the recipe ---------------------------------------------------------------------


def load_recipe(folder: str | os.PathLike) -> dict:
    """The recipe (``soup.json``) of a merged folder.

    Raises:
        FileNotFoundError: the folder has no ``soup.json``.
        CorruptedCheckpointError: ``soup.json`` is not a JSON object.
    """
    file = Path(folder) / RECIPE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no recipe; a model card is rendered from {RECIPE_FILE}")
    try:
        recipe = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CorruptedCheckpointError(f"{file}: invalid JSON ({error})") from None
    if not isinstance(recipe, dict):
        raise CorruptedCheckpointError(f"{file}: the recipe is not a JSON object")
    return recipe


def record_name(record: Mapping[str, Any]) -> str:
    """Display name of an ingredient record: its ``name``, else ``Ingredient.name``'s rule."""
    if record.get("name"):
        return str(record["name"])
    source, revision = str(record.get("source", "?")), record.get("revision")
    return source if not revision else f"{source}@{str(revision)[:10]}"


def hub_id(record: Mapping[str, Any] | None) -> str | None:
    """The Hub repo id of a record resolved from the Hub (``revision`` set), else ``None``."""
    if not record or not record.get("revision") or not record.get("source"):
        return None
    repo_id = str(record["source"]).partition("@")[0]
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id


def _pinned_source(record: Mapping[str, Any]) -> str:
    repo_id = hub_id(record)
    return f"{repo_id}@{record['revision']}" if repo_id else str(record["source"])


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _interval(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = _number(value[0]), _number(value[1])
        if low is not None and high is not None:
            return low, high
    return None


def parse_score_entry(entry: Any, default_metric: str = "score") -> dict[str, Score]:
    """The metrics of one score entry, in any of the recorded forms (see the module doc)."""
    if not isinstance(entry, Mapping):
        value = _number(entry)
        return {default_metric: Score(value)} if value is not None else {}
    n = entry.get("n") if isinstance(entry.get("n"), int) else None
    intervals = entry.get("intervals") if isinstance(entry.get("intervals"), Mapping) else {}
    if isinstance(entry.get("metrics"), Mapping):
        values = entry["metrics"]
        primary = entry.get("primary_metric")
    else:
        values = {
            key: value
            for key, value in entry.items()
            if key not in ("n", "interval", "intervals", "confidence", "name", "primary_metric")
        }
        primary = entry.get("primary_metric")
        if "score" in values and len(values) > 1:
            del values["score"]  # a duplicate of the primary metric
        elif "score" in values:
            values = {default_metric: values["score"]}
            primary = default_metric
    if primary is None and len(values) == 1:
        primary = next(iter(values))
    scores = {}
    for metric, value in values.items():
        number = _number(value)
        if number is None:
            continue
        interval = _interval(intervals.get(metric))
        if interval is None and metric == primary:
            interval = _interval(entry.get("interval"))
        scores[str(metric)] = Score(number, interval, n)
    return scores


@dataclass
class _Scores:
    """``model -> eval set -> metric -> Score``, with model and eval-set order kept."""

    table: dict[str, dict[str, dict[str, Score]]]

    @classmethod
    def from_recipe(cls, raw: Any, default_metric: str) -> _Scores:
        table: dict[str, dict[str, dict[str, Score]]] = {}
        if isinstance(raw, Mapping):
            for model, per_set in raw.items():
                if not isinstance(per_set, Mapping):
                    continue
                for eval_set, entry in per_set.items():
                    parsed = parse_score_entry(entry, default_metric)
                    if parsed:
                        table.setdefault(str(model), {})[str(eval_set)] = parsed
        return cls(table)

    def eval_sets(self) -> list[str]:
        return _unique(name for per_set in self.table.values() for name in per_set)

    def metrics(self) -> list[str]:
        return _unique(
            metric
            for per_set in self.table.values()
            for per_metric in per_set.values()
            for metric in per_metric
        )

    def get(self, model: str, eval_set: str, metric: str) -> Score | None:
        return self.table.get(model, {}).get(eval_set, {}).get(metric)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _sweep(recipe: Mapping[str, Any], default_metric: str) -> list[tuple[float, _Scores]]:
    """``[(alpha, scores keyed by "alpha=a")]`` for a WiSE-FT/PAINT sweep, in recorded order."""
    raw = recipe.get("sweep")
    points: list[tuple[float, Any]] = []
    if isinstance(raw, Mapping):
        alphas = [_number(alpha) for alpha in raw.get("alphas") or []]
        per_set = raw.get("results") if isinstance(raw.get("results"), Mapping) else {}
        if not per_set and isinstance(raw.get("scores"), Mapping):
            per_set = raw["scores"]
        for i, alpha in enumerate(alphas):
            if alpha is None:
                continue
            entries = {
                name: values[i]
                for name, values in per_set.items()
                if isinstance(values, list) and i < len(values)
            }
            points.append((alpha, entries))
    elif isinstance(raw, list):
        for point in raw:
            alpha = _number(point.get("alpha")) if isinstance(point, Mapping) else None
            if alpha is not None:
                points.append((alpha, point.get("scores")))
    return [
        (alpha, _Scores.from_recipe({_alpha_label(alpha): entries}, default_metric))
        for alpha, entries in points
    ]


def _alpha_label(alpha: float) -> str:
    return f"alpha={alpha:g}"


# -- formatting -----------------------------------------------------------------------------


def _is_fraction_metric(metric: str, values: Iterable[float]) -> bool:
    return "accuracy" in metric and all(0.0 <= v <= 1.0 for v in values)


def _format_value(value: float, percent: bool) -> str:
    return f"{100 * value:.1f}" if percent else f"{value:.4g}"


def _format_score(score: Score | None, percent: bool) -> str:
    if score is None:
        return "—"
    text = _format_value(score.value, percent)
    if score.interval is not None:
        low, high = (_format_value(bound, percent) for bound in score.interval)
        text += f" ({low}–{high})"
    return text


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _format_weight(weight: float | None) -> str:
    return "—" if weight is None else f"{weight:.4g}"


# -- metadata -------------------------------------------------------------------------------


def _library_name(folder: Path, recipe: Mapping[str, Any]) -> str | None:
    if recipe.get("library_name"):
        return str(recipe["library_name"])
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    if (folder / "config.json").is_file():
        return "transformers"
    return None


def _read_config(folder: Path) -> dict:
    for name in ("config.json", "open_clip_config.json"):
        file = folder / name
        if file.is_file():
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                logger.warning("%s: invalid JSON, ignored for the model card", file)
                return {}
            return config if isinstance(config, dict) else {}
    return {}


def _architecture(folder: Path, library: str | None) -> str | None:
    config = _read_config(folder)
    if library == "open_clip":
        model_cfg = config.get("model_cfg")
        name = config.get("model_name") or (model_cfg if isinstance(model_cfg, str) else None)
        return f"open_clip {name}" if name else "open_clip CLIP"
    architectures = config.get("architectures") or []
    return str(architectures[0]) if architectures else config.get("model_type")


def _pipeline_tag(folder: Path, recipe: Mapping[str, Any], library: str | None) -> str | None:
    """``image-classification`` for models with a fixed label head, ``zero-shot-...`` for CLIP
    models that classify against any set of class names."""
    if recipe.get("pipeline_tag"):
        return str(recipe["pipeline_tag"])
    if library == "open_clip":
        has_head = (folder / "classifier.safetensors").is_file()
        return "image-classification" if has_head else "zero-shot-image-classification"
    architectures = [str(a) for a in _read_config(folder).get("architectures") or []]
    if any(a.endswith(("ForImageClassification", "Classifier")) for a in architectures):
        return "image-classification"
    if any(a.startswith("CLIP") or a.endswith("CLIPModel") for a in architectures):
        return "zero-shot-image-classification"
    return None


def _parents(recipe: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The records of the models this one is made from (not the greedy soup's dropped ones)."""
    if _patch_kind(recipe) and (recipe.get("zero_shot") or recipe.get("fine_tuned")):
        records = [recipe.get("zero_shot"), recipe.get("fine_tuned")]
    else:
        records = [*(recipe.get("ingredients") or []), recipe.get("base")]
    return [record for record in records if isinstance(record, Mapping)]


def _base_models(recipe: Mapping[str, Any]) -> list[str]:
    if recipe.get("base_model"):
        given = recipe["base_model"]
        return [given] if isinstance(given, str) else [str(item) for item in given]
    return _unique(repo for repo in map(hub_id, _parents(recipe)) if repo)


def _tags(recipe: Mapping[str, Any]) -> list[str]:
    method, kind = recipe.get("method"), _patch_kind(recipe)
    tags = ["hf-soups", "merge"]
    if kind == "wise_ft":
        tags.append("wise-ft")
    elif kind == "paint":
        tags += ["wise-ft", "paint", "model-patching"]
    elif isinstance(recipe.get("soup"), Mapping):
        tags.append("model-soup")
    elif method:
        tags.append(str(method).replace("_", "-"))
    extra = recipe.get("tags") or []
    return _unique([*tags, *([extra] if isinstance(extra, str) else map(str, extra))])


def _datasets(recipe: Mapping[str, Any]) -> list[str] | None:
    datasets = recipe.get("datasets")
    if not datasets:
        return None
    return [datasets] if isinstance(datasets, str) else [str(d) for d in datasets]


def _eval_results(
    scores: _Scores,
    sweep: Sequence[tuple[float, _Scores]],
    recipe: Mapping[str, Any],
    task_type: str,
) -> list[EvalResult]:
    """One ``EvalResult`` per (model, eval set, metric) recorded, and per swept alpha."""
    eval_sets = recipe.get("eval_sets") if isinstance(recipe.get("eval_sets"), Mapping) else {}
    tables = [scores, *(points for _, points in sweep)]
    names = _unique(name for table in tables for name in table.eval_sets())

    def describe(name: str) -> dict:
        info = eval_sets.get(name) if isinstance(eval_sets.get(name), Mapping) else {}
        return {
            "dataset_type": str(info.get("dataset") or name),
            "dataset_name": name,
            "dataset_config": info.get("config"),
            "dataset_split": info.get("split"),
            "dataset_revision": info.get("revision"),
        }

    described = {name: describe(name) for name in names}
    # huggingface_hub groups results by (dataset, config, split, revision): eval sets made from
    # one split (shifted copies of a test set) need a config of their own to stay apart.
    keys: dict[tuple, list[str]] = {}
    for name, info in described.items():
        key = tuple(info[k] for k in ("dataset_type", "dataset_config", "dataset_split"))
        keys.setdefault(key, []).append(name)
    for clashing in keys.values():
        if len(clashing) > 1:
            for name in clashing:
                described[name]["dataset_config"] = name

    # A sweep repeats the scores of its ends and of the chosen alpha; list each model once.
    swept = [_signature(per_set) for points in tables[1:] for per_set in points.table.values()]
    tables[0] = _Scores(
        {
            model: per_set
            for model, per_set in scores.table.items()
            if _signature(per_set) not in swept
        }
    )
    results = []
    for table in tables:
        for model, per_set in table.table.items():
            for eval_set, per_metric in per_set.items():
                for metric, score in per_metric.items():
                    results.append(
                        EvalResult(
                            task_type=task_type,
                            metric_type=metric,
                            metric_value=score.value,
                            metric_name=f"{metric} ({model})",
                            **{k: v for k, v in described[eval_set].items() if v is not None},
                        )
                    )
    return results


def _signature(per_set: Mapping[str, Mapping[str, Score]]) -> dict:
    return {
        (name, metric): score.value
        for name, per in per_set.items()
        for metric, score in per.items()
    }


def card_data(
    recipe: Mapping[str, Any], folder: str | os.PathLike, *, model_name: str | None = None
) -> ModelCardData:
    """The card's metadata: provenance, library, task, tags, datasets and every score."""
    folder = Path(folder)
    library = _library_name(folder, recipe)
    pipeline_tag = _pipeline_tag(folder, recipe, library)
    scores = _Scores.from_recipe(recipe.get("scores"), _default_metric(recipe))
    sweep = _sweep(recipe, _default_metric(recipe))
    results = _eval_results(scores, sweep, recipe, pipeline_tag or "image-classification")
    base_models = _base_models(recipe)
    metrics = _unique(result.metric_type for result in results)
    return ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if base_models else None,
        library_name=library,
        pipeline_tag=pipeline_tag,
        license=recipe.get("license"),
        tags=_tags(recipe),
        datasets=_datasets(recipe),
        metrics=metrics or None,
        model_name=_title(recipe, folder, model_name) if results else None,
        eval_results=results or None,
    )


# -- body -----------------------------------------------------------------------------------


def _title(recipe: Mapping[str, Any], folder: Path, model_name: str | None) -> str:
    return model_name or str(recipe.get("model_name") or folder.resolve().name)


def _soup(recipe: Mapping[str, Any]) -> Mapping[str, Any]:
    soup = recipe.get("soup")
    return soup if isinstance(soup, Mapping) else {}


def _patch_kind(recipe: Mapping[str, Any]) -> str | None:
    """``"wise_ft"`` or ``"paint"`` for interpolations of a zero-shot and a fine-tuned model."""
    kind = recipe.get("kind")
    if kind in PATCHING_METHODS:
        return str(kind)
    method = recipe.get("method")
    return str(method) if method in PATCHING_METHODS else None


def _default_metric(recipe: Mapping[str, Any]) -> str:
    """The name given to bare ``{"score": v}`` entries: the metric the soup was selected on."""
    return str(_soup(recipe).get("metric") or recipe.get("metric") or "score")


def _primary_metric(recipe: Mapping[str, Any], scores: _Scores) -> str:
    """The metric the tables lead with: the selection metric if it was recorded, else
    accuracy, else the first one seen."""
    preferred = _default_metric(recipe)
    metrics = scores.metrics()
    if preferred in metrics:
        return preferred
    if "accuracy" in metrics:
        return "accuracy"
    return metrics[0] if metrics else preferred


def _candidates(recipe: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    records = _soup(recipe).get("candidates") or recipe.get("ingredients") or []
    return [record for record in records if isinstance(record, Mapping)]


def _self_name(recipe: Mapping[str, Any], scores: _Scores) -> str | None:
    """This model's key in ``scores``."""
    soup = _soup(recipe)
    method = soup.get("method") or recipe.get("method")
    alpha = _chosen_alpha(recipe)
    patched = [f"WiSE-FT alpha={alpha:g}", _alpha_label(alpha)] if alpha is not None else []
    for name in (soup.get("name"), f"{method} soup", f"{method}_soup", *patched, method, "soup"):
        if name and name in scores.table:
            return str(name)
    return None


def _ingredient_weights(recipe: Mapping[str, Any]) -> dict[str, float]:
    """Mixing weight per ingredient display name, when the recipe tells them."""
    ingredients = [r for r in recipe.get("ingredients") or [] if isinstance(r, Mapping)]
    names = [record_name(record) for record in ingredients]
    parameters = recipe.get("parameters") if isinstance(recipe.get("parameters"), Mapping) else {}
    weights = parameters.get("weights") or _soup(recipe).get("weights")
    if isinstance(weights, list) and len(weights) == len(names):
        return {name: w for name, w in zip(names, map(_number, weights)) if w is not None}
    alpha = _number(parameters.get("alpha"))
    if _patch_kind(recipe) and alpha is not None and len(names) == 2:
        return {names[0]: 1.0 - alpha, names[1]: alpha}
    return {}


def _ingredient_rows(
    recipe: Mapping[str, Any], scores: _Scores, metric: str, own_set: str | None
) -> tuple[list[dict], bool]:
    """Rows of the ingredients table, and whether a "kept" column applies (greedy soups)."""
    trace = _trace(recipe)
    kept = {entry["ingredient"]: entry["kept"] for entry in trace}
    merged = {record_name(r) for r in recipe.get("ingredients") or [] if isinstance(r, Mapping)}
    weights = _ingredient_weights(recipe)
    records = list(_candidates(recipe))
    known = {record_name(record) for record in records}
    # Greedy soups record only the kept ingredients in full; the others are known by name.
    records += [
        {"name": name, "source": name, "revision": "(not recorded)"}
        for name in kept
        if name not in known
    ]
    percent = _is_fraction_metric(metric, _values(scores, metric))
    rows = []
    for index, record in enumerate(records, start=1):
        name = record_name(record)
        repo_id = hub_id(record)
        rows.append(
            {
                "index": index,
                "name": _cell(name),
                "link": f"https://huggingface.co/{repo_id}" if repo_id else None,
                "source": _cell(record.get("source", name)),
                "revision": _cell(record.get("revision") or "local folder"),
                "weight": _format_weight(weights.get(name, 0.0 if trace else None)),
                "score": _format_score(
                    scores.get(name, own_set, metric) if own_set else None, percent
                ),
                "kept": "yes" if kept.get(name, name in merged) else "no",
            }
        )
    return rows, bool(trace)


def _trace(recipe: Mapping[str, Any]) -> list[dict]:
    entries = []
    for entry in _soup(recipe).get("greedy_trace") or []:
        if isinstance(entry, Mapping) and entry.get("ingredient") is not None:
            soup_score = entry.get("soup_score", entry.get("score"))
            entries.append(
                {
                    "ingredient": str(entry["ingredient"]),
                    "individual": _number(entry.get("individual_score")),
                    "soup": _number(soup_score),
                    "kept": bool(entry.get("kept")),
                    "reason": entry.get("reason") or "",
                }
            )
    return entries


def _values(scores: _Scores, metric: str) -> list[float]:
    return [
        per_metric[metric].value
        for per_set in scores.table.values()
        for per_metric in per_set.values()
        if metric in per_metric
    ]


def _trace_rows(recipe: Mapping[str, Any], metric: str) -> list[dict]:
    trace = _trace(recipe)
    values = [v for e in trace for v in (e["individual"], e["soup"]) if v is not None]
    percent = _is_fraction_metric(metric, values)
    return [
        {
            "step": step,
            "ingredient": _cell(entry["ingredient"]),
            "individual": _format_score(
                Score(entry["individual"]) if entry["individual"] is not None else None, percent
            ),
            "soup": _format_score(
                Score(entry["soup"]) if entry["soup"] is not None else None, percent
            ),
            "kept": "yes" if entry["kept"] else "no",
            "reason": _cell(entry["reason"]),
        }
        for step, entry in enumerate(trace, start=1)
    ]


def _model_order(scores: _Scores, recipe: Mapping[str, Any]) -> list[str]:
    ingredients = [record_name(record) for record in _candidates(recipe)]
    first = [name for name in ingredients if name in scores.table]
    return _unique([*first, *scores.table])


def _results_tables(
    scores: _Scores, models: Sequence[str], self_name: str | None, primary: str
) -> list[dict]:
    """One table per metric: models as rows, eval sets as columns."""
    tables = []
    metrics = scores.metrics()
    metrics = sorted(metrics, key=lambda m: m != primary)
    for metric in metrics:
        eval_sets = [
            name
            for name in scores.eval_sets()
            if any(scores.get(model, name, metric) for model in models)
        ]
        percent = _is_fraction_metric(metric, _values(scores, metric))
        columns = []
        for eval_set in eval_sets:
            sizes = {
                s.n for m in models if (s := scores.get(m, eval_set, metric)) and s.n is not None
            }
            size = f" (n={sizes.pop()})" if len(sizes) == 1 else ""
            columns.append(_cell(f"{eval_set}{size}"))
        rows = []
        for model in models:
            cells = [_format_score(scores.get(model, s, metric), percent) for s in eval_sets]
            if all(cell == "—" for cell in cells):
                continue
            label = _cell(model) + (" (this model)" if model == self_name else "")
            rows.append({"model": f"**{label}**" if model == self_name else label, "cells": cells})
        if rows:
            unit = " (%)" if percent else ""
            tables.append({"metric": f"{metric}{unit}", "columns": columns, "rows": rows})
    return tables


def _sweep_table(
    sweep: Sequence[tuple[float, _Scores]], chosen: float | None, metric: str
) -> dict | None:
    if not sweep:
        return None
    merged = _Scores({label: per for _, s in sweep for label, per in s.table.items()})
    metrics = merged.metrics()
    if metric not in metrics:
        metric = metrics[0] if metrics else metric
    eval_sets = merged.eval_sets()
    percent = _is_fraction_metric(metric, _values(merged, metric))
    rows = []
    for alpha, scores in sweep:
        label = _alpha_label(alpha)
        cells = [_format_score(scores.get(label, s, metric), percent) for s in eval_sets]
        is_chosen = chosen is not None and math.isclose(alpha, chosen, abs_tol=1e-12)
        rows.append(
            {"alpha": f"**{alpha:g}** (chosen)" if is_chosen else f"{alpha:g}", "cells": cells}
        )
    unit = " (%)" if percent else ""
    return {"metric": f"{metric}{unit}", "columns": [_cell(s) for s in eval_sets], "rows": rows}


def _plots(folder: Path, recipe: Mapping[str, Any]) -> list[str]:
    """Relative links to the plots present in the folder: those the recipe lists, then others."""
    listed = [str(p) for p in recipe.get("plots") or [] if isinstance(p, str)]
    for plot in listed:
        if not (folder / plot).is_file():
            logger.warning("%s: plot %s listed in %s is missing", folder, plot, RECIPE_FILE)
    present = [p for p in listed if (folder / p).is_file()]
    others = sorted(
        p.name for p in folder.glob("*") if p.suffix.lower() in _PLOT_SUFFIXES and p.is_file()
    )
    return _unique([*present, *others])


def _reproduce(recipe: Mapping[str, Any], title: str) -> dict:
    """The command (or Python call) that rebuilds the weights from the recipe."""
    if recipe.get("command"):
        return {"language": "bash", "code": str(recipe["command"]), "note": None}
    method = recipe.get("method")
    ingredients = [r for r in recipe.get("ingredients") or [] if isinstance(r, Mapping)]
    sources = [_pinned_source(record) for record in ingredients if record.get("source")]
    if len(sources) != len(ingredients) or not sources:
        return {"language": None, "code": None, "note": None}
    parameters = recipe.get("parameters") if isinstance(recipe.get("parameters"), Mapping) else {}
    if _patch_kind(recipe) and "alpha" in parameters and len(sources) == 2:
        # The interpolation of the two recorded ends; the sweep only chose alpha.
        words = ["hf-soups", "wise-ft", *sources, "--alpha", repr(float(parameters["alpha"]))]
        if recipe.get("dtype"):
            words += ["--dtype", str(recipe["dtype"])]
        return {"language": "bash", "code": shlex.join([*words, "--out", title]), "note": None}
    if _soup(recipe).get("method") == "learned_by_layer":
        note = (
            "A learned soup by layer has one weight per model and tensor (in the recipe); "
            "rebuild it with `SoupBuilder.learned(..., by_layer=True)`."
        )
        return {"language": None, "code": None, "note": note}
    weights = parameters.get("weights")
    if method != "weighted_average" or not isinstance(weights, list):
        note = (
            f"Merge the ingredients with `{method}` and the parameters of the recipe "
            "through the Python API (`hf_soups.merge.merge(..., method=...)`)."
        )
        return {"language": None, "code": None, "note": note}
    words = ["hf-soups", "merge", *sources, "--weights", ",".join(repr(float(w)) for w in weights)]
    if recipe.get("dtype"):
        words += ["--dtype", str(recipe["dtype"])]
    words += ["--out", title]
    return {"language": "bash", "code": shlex.join(words), "note": None}


def _method_text(recipe: Mapping[str, Any]) -> tuple[str, str | None]:
    """Two sentences on the method with its paper, and the BibTeX key to show."""
    method, kind = recipe.get("method"), _patch_kind(recipe)
    if kind is not None:
        text, paper = _PATCH_METHODS[kind]
        return f"{text} ({paper}).", kind
    soup_method = _soup(recipe).get("method")
    if soup_method in _SOUP_METHODS:
        return f"{_SOUP_METHODS[soup_method]} ({_SOUPS_PAPER}).", "soups"
    if method == "weighted_average":
        return (
            "The model is a weighted average of the ingredients' weights, tensor by tensor, "
            "with the mixing weights below. Models fine-tuned from one pre-trained start can be "
            f"averaged because they lie in one low-error basin ({_SOUPS_PAPER}).",
            "soups",
        )
    citation = recipe.get("citation") or _soup(recipe).get("citation")
    parameters = json.dumps(recipe.get("parameters") or {}, sort_keys=True)
    text = (
        f"The ingredients were merged tensor by tensor with `{method}` (parameters "
        f"`{parameters}`). " + (f"The method is described in {citation}." if citation else "")
    )
    return text.strip(), None


def _summary(recipe: Mapping[str, Any], architecture: str | None, library: str | None) -> str:
    method = recipe.get("method")
    made = f" It was made with {recipe['library']}." if recipe.get("library") else ""
    if architecture:
        made += f" Architecture: `{architecture}`" + (f" ({library})." if library else ".")
    kind = _patch_kind(recipe)
    if kind is not None:
        alpha = _chosen_alpha(recipe)
        alpha_text = f" with α = {alpha:g}" if alpha is not None else ""
        ends = [record_name(r) for r in _parents(recipe)]
        between = f" between `{ends[0]}` and `{ends[1]}`" if len(ends) == 2 else ""
        label = "WiSE-FT" if kind == "wise_ft" else "PAINT"
        return f"This model is a {label} interpolation{alpha_text}{between}.{made}"
    ingredients = recipe.get("ingredients") or []
    soup_method = _soup(recipe).get("method")
    if soup_method:
        considered = max(len(_candidates(recipe)), len(_trace(recipe)))
        of = f" (of {considered} considered)" if considered > len(ingredients) else ""
        return (
            f"This model is a {str(soup_method).replace('_', ' ')} soup of "
            f"{_count(len(ingredients), 'fine-tuned checkpoint')}{of}.{made}"
        )
    return f"This model is a `{method}` merge of {_count(len(ingredients), 'checkpoint')}.{made}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _chosen_alpha(recipe: Mapping[str, Any]) -> float | None:
    chosen = _number(recipe.get("chosen_alpha"))
    if chosen is None and isinstance(recipe.get("parameters"), Mapping):
        chosen = _number(recipe["parameters"].get("alpha"))
    return chosen


def _patch_rows(recipe: Mapping[str, Any], scores: _Scores, metric: str) -> list[dict]:
    """The two interpolated models, with their weights and scores at the ends of the sweep."""
    weights = _ingredient_weights(recipe)
    ingredients = [r for r in recipe.get("ingredients") or [] if isinstance(r, Mapping)]
    ends = {
        "zero-shot (α = 0)": recipe.get("zero_shot") or (ingredients[:1] or [None])[0],
        "fine-tuned (α = 1)": recipe.get("fine_tuned") or (ingredients[1:2] or [None])[0],
    }
    sweep = dict(_sweep(recipe, _default_metric(recipe)))
    alpha_for = {"zero-shot (α = 0)": 0.0, "fine-tuned (α = 1)": 1.0}
    chosen = _chosen_alpha(recipe)
    merged_names = [record_name(r) for r in ingredients]
    rows = []
    for role, record in ends.items():
        if not isinstance(record, Mapping):
            continue
        name = record_name(record)
        weight = weights.get(name)
        if weight is None and chosen is not None and len(merged_names) != 2:
            weight = 1.0 - chosen if alpha_for[role] == 0.0 else chosen
        end_scores = sweep.get(alpha_for[role])
        cells = []
        for eval_set in end_scores.eval_sets() if end_scores else []:
            score = end_scores.get(_alpha_label(alpha_for[role]), eval_set, metric)
            percent = _is_fraction_metric(metric, [score.value] if score else [])
            cells.append(f"{_cell(eval_set)}: {_format_score(score, percent)}")
        repo_id = hub_id(record)
        rows.append(
            {
                "role": role,
                "name": _cell(name),
                "link": f"https://huggingface.co/{repo_id}" if repo_id else None,
                "revision": _cell(record.get("revision") or "local folder"),
                "weight": _format_weight(weight),
                "score": "; ".join(cells) or "—",
            }
        )
    return rows


def _comparisons(recipe: Mapping[str, Any]) -> list[str]:
    return [
        str(item["verdict"])
        for item in recipe.get("comparisons") or []
        if isinstance(item, Mapping) and item.get("verdict")
    ]


def _template(name: str) -> jinja2.Template:
    text = resources.files("hf_soups").joinpath("model_cards", name).read_text(encoding="utf-8")
    environment = jinja2.Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # markdown, not HTML
    )
    return environment.from_string(text)


def render_card(
    folder: str | os.PathLike,
    *,
    recipe: Mapping[str, Any] | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """Render the model card of a merged folder from its recipe.

    Args:
        folder: the model folder (its config and plots are looked at; nothing is written).
        recipe: the recipe; default: the folder's ``soup.json``.
        model_name: the card's title and ``model-index`` name; default: the recipe's
            ``model_name`` or the folder's name.
    """
    folder = Path(folder)
    recipe = dict(recipe) if recipe is not None else load_recipe(folder)
    title = _title(recipe, folder, model_name)
    data = card_data(recipe, folder, model_name=title)
    scores = _Scores.from_recipe(recipe.get("scores"), _default_metric(recipe))
    sweep = _sweep(recipe, _default_metric(recipe))
    swept = _Scores({label: per for _, points in sweep for label, per in points.table.items()})
    metric = _primary_metric(recipe, scores if scores.table else swept)
    self_name = _self_name(recipe, scores)
    library = data.library_name
    soup = _soup(recipe)
    own_set = soup.get("held_out")
    if own_set is None or own_set not in scores.eval_sets():
        own_set = next(iter(scores.eval_sets()), None)
    method_text, bibtex_key = _method_text(recipe)
    patching = _patch_kind(recipe) is not None
    context = {
        "card_data": data.to_yaml(),
        "title": title,
        "summary": _summary(recipe, _architecture(folder, library), library),
        "method_text": method_text,
        "parameters": json.dumps(recipe.get("parameters") or {}, sort_keys=True),
        "metric": metric,
        "own_set": own_set,
        "results": _results_tables(scores, _model_order(scores, recipe), self_name, metric),
        "has_intervals": any(
            score.interval is not None
            for table in (scores, swept)
            for per_set in table.table.values()
            for per_metric in per_set.values()
            for score in per_metric.values()
        ),
        "comparisons": _comparisons(recipe),
        "plots": _plots(folder, recipe),
        "recipe_json": json.dumps(recipe, indent=2, ensure_ascii=False),
        "reproduce": _reproduce(recipe, title),
        "bibtex": _BIBTEX.get(bibtex_key) if bibtex_key else None,
        "citation": None if bibtex_key else recipe.get("citation"),
    }
    if patching:
        template = _template("wise_ft.md")
        context["ends"] = _patch_rows(recipe, scores, metric)
        selection = recipe.get("selection")
        context["selection"] = (
            selection.get("description") if isinstance(selection, Mapping) else None
        )
        context["chosen_alpha"] = _chosen_alpha(recipe)
        context["sweep"] = _sweep_table(sweep, context["chosen_alpha"], metric)
    else:
        template = _template("soup.md")
        context["ingredients"], context["greedy"] = _ingredient_rows(
            recipe, scores, metric, own_set
        )
        context["trace"] = _trace_rows(recipe, metric)
        context["held_out"] = soup.get("held_out")
        context["trace_metric"] = soup.get("metric") or metric
    return ModelCard(template.render(**context))


def write_card(folder: str | os.PathLike, *, model_name: str | None = None) -> Path:
    """Render the card of a merged folder from its ``soup.json`` and write it as ``README.md``.

    The file is replaced atomically, so an interrupted call leaves the previous card intact.

    Returns:
        The path of the written ``README.md``.
    """
    folder = Path(folder)
    card = render_card(folder, model_name=model_name)
    path = folder / CARD_FILE
    temporary = path.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    try:
        temporary.write_text(str(card), encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("Wrote the model card %s", path)
    return path
