"""A card's YAML front matter (:class:`~huggingface_hub.ModelCardData`) from a recipe.

``base_model`` lists the Hub ingredients (local ones are named only in the body);
``model-index`` holds this model's own scores on eval sets whose Hub dataset is known (the
other models' scores stay in the body's tables: the Hub would credit them to this model);
``datasets`` the Hub datasets the recipe names; ``license`` the one given, or the one every
ingredient's own card agrees on.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache

from hf_soups.cards.family import family_metadata
from hf_soups.cards.scores import own_scores
from hf_soups.cards.sources import hub_id, is_repo_id
from hf_soups.output import final_name
from hf_soups.recipe.schema import Recipe, Source

if TYPE_CHECKING:
    from hf_soups.models.families import CardMetadata

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
DEFAULT_TASK = "image-classification"


def card_data(
    recipe: Recipe,
    folder: str | os.PathLike,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    family: CardMetadata | None = None,
) -> ModelCardData:
    """The card's metadata: provenance, license, library, task, tags, datasets, own scores.

    Args:
        recipe: the folder's recipe as recorded (local paths are read to find the ingredients'
            licenses, and published nowhere).
        folder: the model folder (its config decides library and pipeline tag).
        model_name: the ``model-index`` name; default: the folder's name.
        repo_id: the repository the folder is published as (for the loading code).
        family: the family's card metadata, when already known.
    """
    folder = Path(folder)
    title = model_name or final_name(folder)
    family = family or family_metadata(folder, recipe, repo_id or title)
    results = eval_results(recipe, family.pipeline_tag or DEFAULT_TASK)
    base_models = list(dict.fromkeys(filter(None, map(hub_id, parents(recipe)))))
    return ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if base_models else None,
        library_name=family.library_name,
        pipeline_tag=family.pipeline_tag,
        license=recipe.license or inherited_license(recipe),
        tags=tags(recipe),
        datasets=datasets(recipe) or None,
        metrics=list(dict.fromkeys(r.metric_type for r in results)) or None,
        model_name=title if results else None,
        eval_results=results or None,
    )


def parents(recipe: Recipe) -> list[Source]:
    """The models this one is made from: the merged ingredients and the base."""
    return [*recipe.ingredients, *([recipe.base] if recipe.base else [])]


def tags(recipe: Recipe) -> list[str]:
    found = ["hf-soups", "merge"]
    if recipe.patch is not None:
        found += (
            ["wise-ft", "paint", "model-patching"] if recipe.patch.kind == "paint" else ["wise-ft"]
        )
    elif recipe.soup is not None:
        found.append("model-soup")
    else:
        found.append(recipe.method.replace("_", "-"))
    return list(dict.fromkeys([*found, *recipe.tags]))


def hub_dataset(recipe: Recipe, eval_set: str) -> str | None:
    """The Hub dataset id an eval set was drawn from, when the recipe records a valid one."""
    dataset = (recipe.eval_sets.get(eval_set) or {}).get("dataset")
    return dataset if isinstance(dataset, str) and is_repo_id(dataset) else None


def datasets(recipe: Recipe) -> list[str]:
    """The Hub datasets named by the recipe: ``datasets``, then the eval sets' Hub ids."""
    named = [*recipe.datasets, *filter(None, (hub_dataset(recipe, s) for s in recipe.eval_sets))]
    for name in named:
        if not is_repo_id(name):
            logger.info("dataset %r is not a Hub dataset id; not listed in the card metadata", name)
    return list(dict.fromkeys(name for name in named if is_repo_id(name)))


def _described(recipe: Recipe, eval_set: str) -> dict[str, Any] | None:
    dataset = hub_dataset(recipe, eval_set)
    if dataset is None:
        return None
    info = recipe.eval_sets[eval_set]
    optional = {key: info.get(key) for key in ("config", "split", "revision")}
    return {
        "dataset_type": dataset,
        "dataset_name": eval_set,
        **{f"dataset_{key}": str(v) for key, v in optional.items() if v is not None},
    }


def eval_results(recipe: Recipe, task_type: str) -> list[EvalResult]:
    """One ``EvalResult`` per metric of this model on each eval set with a Hub dataset.

    Eval sets without one are left out: the model-index needs a dataset id (``dataset.type``),
    and a local eval set's name is none.
    """
    own = own_scores(recipe)
    described = {name: _described(recipe, name) for name in own}
    local = [name for name, info in described.items() if info is None]
    if local:
        logger.info(
            "eval set(s) %s name no Hub dataset in the recipe (eval_sets.<name>.dataset): "
            "their scores are in the card's body, not in its model-index",
            ", ".join(local),
        )
    # huggingface_hub groups results by dataset, config, split and revision: eval sets drawn
    # from one split (shifted copies of a test set) need a config of their own to stay apart.
    groups: dict[tuple, list[str]] = {}
    for name, info in described.items():
        if info is not None:
            key = tuple(info.get(f"dataset_{k}") for k in ("type", "config", "split", "revision"))
            groups.setdefault(key, []).append(name)
    for names in groups.values():
        if len(names) > 1:
            for name in names:
                described[name]["dataset_config"] = name
    return [
        EvalResult(task_type=task_type, metric_type=metric, metric_value=value, **info)
        for name, info in described.items()
        if info is not None
        for metric, value in own[name].metrics.items()
        if math.isfinite(value)
    ]


def inherited_license(recipe: Recipe) -> str | None:
    """The license every ingredient's own card (``README.md`` in its folder, or in the Hub
    cache for a Hub source) declares, when they all declare the same one; else ``None``, with
    the reason logged."""
    licenses = {}
    for source in parents(recipe):
        card = _card_file(source)
        if card is None:
            logger.info(
                "No license in the card: %s has no model card to inherit one from",
                source.display_name,
            )
            return None
        try:
            declared = ModelCard.load(card, ignore_metadata_errors=True).data.license
        except (OSError, ValueError, yaml.YAMLError) as error:
            logger.info(
                "No license in the card: %s's card is unreadable (%s)", source.display_name, error
            )
            return None
        # One license id; a list of them (dual licensing) is for the user to choose from.
        licenses[source.display_name] = declared if isinstance(declared, str) else None
    found = set(licenses.values())
    if len(found) == 1 and None not in found:
        return found.pop()
    logger.info(
        "No license in the card: the ingredients' cards declare %s; give one with --license",
        ", ".join(f"{name}: {value or 'none'}" for name, value in licenses.items()),
    )
    return None


def _card_file(source: Source) -> Path | None:
    repo_id = hub_id(source)
    if repo_id is not None:
        cached = try_to_load_from_cache(repo_id, CARD_FILE, revision=source.revision)
        return Path(cached) if isinstance(cached, str) else None
    file = Path(source.source).expanduser() / CARD_FILE
    return file if file.is_file() else None
