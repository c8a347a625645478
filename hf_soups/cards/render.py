"""Render a model card from a folder's recipe, and write it as the folder's ``README.md``."""

from __future__ import annotations

import json
import logging
import os
import re
from functools import cache
from importlib import resources
from pathlib import Path

import jinja2
from huggingface_hub import ModelCard

import hf_soups.cards.scores as score_views
import hf_soups.cards.tables as tables
from hf_soups.cards.family import architecture, family_metadata
from hf_soups.cards.metadata import CARD_FILE, card_data
from hf_soups.cards.size import size_section
from hf_soups.cards.sparsity import mask_counts, sparsity_section
from hf_soups.cards.text import citations_of, method_text, reproduce, summary
from hf_soups.output import final_name, final_path
from hf_soups.recipe.schema import RECIPE_FILE, Recipe

logger = logging.getLogger(__name__)

_PLOT_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")


@cache
def card_template(name: str) -> jinja2.Template:
    """The jinja template ``model_cards/<name>`` shipped with the package."""
    text = resources.files("hf_soups").joinpath("model_cards", name).read_text(encoding="utf-8")
    environment = jinja2.Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # markdown, not HTML
    )
    return environment.from_string(text)


def _plots(folder: Path, recipe: Recipe) -> list[str]:
    """Relative links to the plots present in the folder: those the recipe lists, then others."""
    missing = [plot for plot in recipe.plots if not (folder / plot).is_file()]
    if missing:
        # Plots are drawn after the weights: a card written by the merge itself is rewritten
        # once they exist.
        logger.info(
            "%s: plot(s) %s listed in %s not there (yet); not linked", folder, missing, RECIPE_FILE
        )
    present = [plot for plot in recipe.plots if plot not in missing]
    others = sorted(
        p.name for p in folder.glob("*") if p.suffix.lower() in _PLOT_SUFFIXES and p.is_file()
    )
    return list(dict.fromkeys([*present, *others]))


def render_card(
    folder: str | os.PathLike,
    *,
    recipe: Recipe | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Render the model card of a merged folder from its recipe.

    Everything shown is published as is: local sources appear by their folder names only
    (:meth:`~hf_soups.recipe.Recipe.public`).

    Args:
        folder: the model folder (its config and plots are looked at; nothing is written).
        recipe: the recipe; default: the folder's ``soup.json``.
        model_name: the card's title and ``model-index`` name; default: the folder's name (the
            name it will have, for a folder :func:`~hf_soups.output.atomic_output_dir` writes).
        repo_id: the repository the folder is published as, for the loading code; default:
            ``model_name``.

    Raises:
        RecipeError: the folder has no ``soup.json``, or a malformed one.
        ValueError: ``license`` is not written as a Hub license id.
    """
    folder = Path(folder)
    recipe = recipe if recipe is not None else Recipe.load(folder)
    title = model_name or final_name(folder)
    family = family_metadata(folder, recipe, repo_id or title)
    data = card_data(recipe, folder, model_name=title, repo_id=repo_id, family=family)
    public = recipe.public()
    scores = public.scores
    points = score_views.sweep_points(public.patch)
    swept = {f"{alpha:g}": per_set for alpha, per_set in points}
    metric = score_views.primary_metric(public, scores or swept)
    own_set = public.soup.held_out if public.soup else None
    if own_set not in score_views.eval_sets(scores):
        own_set = next(iter(score_views.eval_sets(scores)), None)
    self_name = score_views.self_name(public)
    order = tables.model_order(public, scores)
    masks = mask_counts(folder)
    context = {
        "card_data": data.to_yaml(),
        "title": title,
        "summary": summary(public, architecture(folder), family.library_name),
        "method_text": method_text(public),
        "parameters": json.dumps(public.parameters, sort_keys=True),
        "size": size_section(folder, masks),
        "usage": family.snippet,
        "needs_hf_soups": family.needs_hf_soups,
        "metric": metric,
        "own_set": own_set,
        "results": tables.results_tables(scores, order, self_name, metric),
        "has_intervals": score_views.has_intervals(scores, swept),
        "comparisons": [str(c["verdict"]) for c in public.comparisons if c.get("verdict")],
        "plots": _plots(folder, public),
        "recipe_json": json.dumps(public.to_dict(), indent=2, ensure_ascii=False),
        "reproduce": reproduce(public, final_name(folder)),
        "citations": [
            {"bibtex": paper.lstrip().startswith("@"), "text": paper}
            for paper in citations_of(public)
        ],
    }
    if public.patch is not None:
        template = card_template("wise_ft.md")
        context["ends"] = tables.end_rows(public, points, metric)
        context["selection"] = public.patch.selection.get("description")
        context["chosen_alpha"] = public.patch.chosen_alpha
        context["sweep"] = tables.sweep_table(points, public.patch.chosen_alpha, metric)
    else:
        template = card_template("soup.md")
        context["ingredients"], context["greedy"] = tables.ingredient_rows(
            public, scores, metric, own_set
        )
        context["trace"] = tables.trace_rows(public, metric)
        context["held_out"] = public.soup.held_out if public.soup else None
        context["trace_metric"] = (public.soup.metric if public.soup else None) or metric
        context["sparsity"] = sparsity_section(folder, public, masks)
    return ModelCard(template.render(**context))


def _replace(path: Path, text: str) -> None:
    """Write ``path`` atomically: an interrupted call leaves the previous file intact."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def check_license(license: str) -> None:
    """Refuse what cannot be a Hub license id (``mit``, ``apache-2.0``, ``cc-by-nc-4.0``,
    ``other``...): the Hub's ids are lowercase words joined by ``-``, ``.`` or ``+``."""
    if not _LICENSE_ID.fullmatch(license):
        raise ValueError(
            f"license {license!r} is not a Hub license id (lowercase, no spaces: 'mit', "
            "'apache-2.0', 'cc-by-4.0', or 'other')"
        )


def write_card(
    folder: str | os.PathLike,
    *,
    model_name: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Render the card of a merged folder from its ``soup.json`` and write it as ``README.md``.

    Args:
        folder: a model folder holding ``soup.json``.
        model_name: the card's title and ``model-index`` name; default: the folder's name (the
            name it will have, for a folder :func:`~hf_soups.output.atomic_output_dir` writes).
        license: the model's license (a Hub license id such as ``"mit"``), recorded in
            ``soup.json``; default: the recorded one, else the one all ingredients' own cards
            agree on, else none (logged).
        repo_id: the repository the folder will be published as, for the loading code.

    Returns:
        The path of the written ``README.md``.

    Raises:
        RecipeError: the folder has no ``soup.json``, or a malformed one.
        ValueError: ``license`` is not written as a Hub license id.
    """
    folder = Path(folder)
    recipe = Recipe.load(folder)
    if license is not None:
        check_license(license)
    if license is not None and license != recipe.license:
        recipe.license = license
        _replace(folder / RECIPE_FILE, json.dumps(recipe.to_dict(), indent=2) + "\n")
    card = render_card(folder, recipe=recipe, model_name=model_name, repo_id=repo_id)
    path = folder / CARD_FILE
    _replace(path, str(card))
    logger.info("Wrote the model card %s", final_path(path))
    return path
