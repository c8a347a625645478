"""The model card of a structurally reduced model, rendered from the ``reduction.json`` that
:func:`hf_soups.pruning.reduction.save_reduced` writes beside it.

The card says what was removed (parameters and forward FLOPs before and after, each tower's MLP
width), how (the steps, the importance method and its paper) and how to load the folder (plain
``from_pretrained``). Metadata: ``library_name`` and ``pipeline_tag`` from the model family (as
the soup cards), the tags ``hf-soups``, ``pruning``, ``structured-pruning``, and ``base_model``
when the reduced model's start is a Hub model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from hf_soups.cards.family import folder_metadata
from hf_soups.cards.metadata import CARD_FILE
from hf_soups.cards.render import card_template
from hf_soups.cards.size import flops_note
from hf_soups.cards.sources import is_repo_id
from hf_soups.errors import RecipeError
from hf_soups.output import final_name, final_path

logger = logging.getLogger(__name__)

REDUCTION_FILE = "reduction.json"
TAGS = ["hf-soups", "pruning", "structured-pruning"]
_IMPORTANCE = {
    "taylor": "first-order Taylor importance (the loss change removing the neuron causes)",
    "magnitude": "the norms of its weights (no data)",
}


def _reduction(before: int, after: int) -> str:
    return f"{1 - after / before:.1%}" if before else "–"


def _widths(sizes: dict[str, int]) -> str:
    return " / ".join(f"{tower} {size}" for tower, size in sizes.items())


def _size_rows(record: dict[str, Any]) -> list[dict[str, str]]:
    rows = [
        {
            "what": what,
            "before": f"{record[key]['before']:,}",
            "after": f"{record[key]['after']:,}",
            "reduction": _reduction(record[key]["before"], record[key]["after"]),
        }
        for what, key in (("Parameters", "parameters"), ("Forward FLOPs per example", "flops"))
    ]
    widths = record["intermediate_size"]
    for tower, before in widths["before"].items():
        after = widths["after"][tower]
        rows.append(
            {
                "what": f"MLP width (`intermediate_size`), {tower} tower",
                "before": str(before),
                "after": str(after),
                "reduction": _reduction(before, after),
            }
        )
    return rows


def _step_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "index": index,
            "importance": step["importance"],
            "removed": _widths(step["neurons_removed_per_layer"]),
            "widths": _widths(step["intermediate_size"]),
            "parameters": f"{step['parameters']['after']:,}",
            "flops": f"{step['flops']['after']:,}",
        }
        for index, step in enumerate(record["steps"], start=1)
    ]


def read_reduction(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's ``reduction.json``.

    Raises:
        RecipeError: the folder has none, or it is not a JSON object.
    """
    file = Path(folder) / REDUCTION_FILE
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RecipeError(f"{file}: no readable reduction record ({error})") from None
    if not isinstance(record, dict):
        raise RecipeError(f"{file}: not a JSON object")
    return record


def render_reduction_card(
    folder: str | os.PathLike,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    task=None,
) -> ModelCard:
    """Render the card of a reduced model folder from its ``reduction.json`` and config.

    Args:
        folder: the folder :func:`~hf_soups.pruning.reduction.save_reduced` wrote.
        model_name: the card's title; default: the folder's name (the name it will have, for a
            folder :func:`~hf_soups.output.atomic_output_dir` writes).
        repo_id: the repository the folder is published as, for the loading code; default:
            ``model_name``.
        task: a :class:`~hf_soups.models.ZeroShotTask` whose class names and prompts the
            zero-shot snippet of a CLIP model shows.
    """
    folder = Path(folder)
    record = read_reduction(folder)
    title = model_name or final_name(folder)
    repo = repo_id or title
    family = folder_metadata(folder, repo, task)
    base_model = record.get("base_model")
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name=family.library_name,
        pipeline_tag=family.pipeline_tag,
        tags=TAGS,
    )
    methods = record["importance"]
    flops = record["flops"]
    context = {
        "card_data": data.to_yaml(),
        "title": title,
        "architecture": record["architecture"],
        "base_model": base_model,
        "parameter_reduction": f"{record['parameters']['reduction']:.1%}",
        "flop_reduction": f"{flops['reduction']:.1%}",
        "size": _size_rows(record),
        "flops_note": flops_note(
            flops.get("text_tokens"), images="vision" in record["intermediate_size"]["before"]
        ),
        "importance_text": " or ".join(_IMPORTANCE.get(m, m) for m in methods) or "importance",
        "steps": _step_rows(record),
        "repo_id": repo if is_repo_id(repo) else final_name(folder),
        "usage": family.snippet,
        "citations": record.get("importance_references", []),
    }
    return ModelCard(card_template("reduction.md").render(**context))


def write_reduction_card(folder: str | os.PathLike, **options: Any) -> Path:
    """Render the reduced folder's card (see :func:`render_reduction_card`, which takes the
    same keyword arguments) and write it as its ``README.md``."""
    path = Path(folder) / CARD_FILE
    path.write_text(str(render_reduction_card(folder, **options)), encoding="utf-8")
    logger.info("Wrote the model card %s", final_path(path))
    return path
