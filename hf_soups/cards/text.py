"""A card's prose: what the model is, how its method works (two sentences per method, with the
paper), how to rebuild it, and the BibTeX to cite."""

from __future__ import annotations

import json
import re
import shlex

from hf_soups import citations
from hf_soups.cards.sources import hub_id, pinned
from hf_soups.commands.merge import MERGE_METHODS
from hf_soups.recipe.schema import Recipe

# Two sentences per method: what it does, and why it helps.
SOUP_METHODS = {
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
PATCH_METHODS = {
    "wise_ft": (
        "WiSE-FT interpolates the weights of a zero-shot model and of the same model fine-tuned "
        "on a target task, θ = (1 − α)·θ_zero-shot + α·θ_fine-tuned. Intermediate α keeps most "
        "of the fine-tuned accuracy while recovering the zero-shot model's robustness to "
        "distribution shift"
    ),
    "paint": (
        "PAINT patches an open-vocabulary model by interpolating its weights with the weights "
        "fine-tuned on the tasks to patch, θ = (1 − α)·θ_zero-shot + α·θ_fine-tuned. α is "
        "chosen to gain accuracy on the patching tasks while keeping it on the tasks the model "
        "already supported"
    ),
}
WEIGHTED_AVERAGE = (
    "The model is a weighted average of the ingredients' weights, tensor by tensor, with the "
    "mixing weights below. Models fine-tuned from one pre-trained start can be averaged because "
    "they lie in one low-error basin"
)
_ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")


def citations_of(recipe: Recipe) -> list[str]:
    """The papers to cite (BibTeX as recorded by the method classes and
    :mod:`hf_soups.citations`), the method's own first."""
    if recipe.patch is not None:
        if recipe.patch.kind == "paint":
            papers = [recipe.patch.citation or citations.PAINT]
        else:
            papers = [recipe.patch.citation or recipe.citation or citations.WISE_FT]
    elif recipe.soup is not None and recipe.soup.method in SOUP_METHODS:
        papers = [recipe.soup.citation or citations.SOUPS, recipe.citation]
    elif recipe.soup is not None:
        papers = [recipe.soup.citation, recipe.citation]
    elif recipe.method == "weighted_average":
        papers = [citations.SOUPS]
    else:
        papers = [recipe.citation]
    pruning = recipe.soup.pruning if recipe.soup is not None else None
    if pruning is not None and pruning.recipe is not None and pruning.recipe.copies_per_round:
        papers.append(citations.SPARSE_SOUPS)
    return list(dict.fromkeys(paper for paper in papers if paper))


def _paper_link(citation: str | None) -> str:
    found = _ARXIV.search(citation or "")
    if found is None:
        return ""
    number = found.group(1)
    return f" ([arXiv:{number}](https://arxiv.org/abs/{number}))"


def method_text(recipe: Recipe) -> str:
    """Two sentences on the method, with a link to its paper."""
    papers = citations_of(recipe)
    paper = _paper_link(papers[0] if papers else None)
    if recipe.patch is not None:
        kind = "paint" if recipe.patch.kind == "paint" else "wise_ft"
        return f"{PATCH_METHODS[kind]}{paper}."
    if recipe.soup is not None and recipe.soup.method in SOUP_METHODS:
        return f"{SOUP_METHODS[recipe.soup.method]}{paper}."
    if recipe.method == "weighted_average":
        return f"{WEIGHTED_AVERAGE}{paper}."
    parameters = json.dumps(recipe.parameters, sort_keys=True)
    described = f" It is described in the paper cited below{paper}." if papers else ""
    return f"The ingredients were merged tensor by tensor with `{recipe.method}` (parameters `{parameters}`).{described}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary(recipe: Recipe, architecture: str | None, library: str | None) -> str:
    """One paragraph: what the model is, what made it, its architecture."""
    made = f" It was made with {recipe.library}." if recipe.library else ""
    if architecture:
        made += f" Architecture: `{architecture}`" + (f" ({library})." if library else ".")
    if recipe.patch is not None:
        label = "PAINT" if recipe.patch.kind == "paint" else "WiSE-FT"
        ends = (
            f"`{recipe.patch.zero_shot.display_name}` and `{recipe.patch.fine_tuned.display_name}`"
        )
        return (
            f"This model is a {label} interpolation with α = {recipe.patch.chosen_alpha:g} "
            f"between {ends}.{made}"
        )
    merged = len(recipe.ingredients)
    if recipe.soup is not None:
        considered = max(len(recipe.soup.candidates or []), len(recipe.soup.greedy_trace or []))
        of = f" (of {considered} considered)" if considered > merged else ""
        kind = recipe.soup.method.replace("_", " ")
        pruning = recipe.soup.pruning.recipe if recipe.soup.pruning else None
        if pruning is not None and pruning.copies_per_round and pruning.soup:
            # The Sparse Model Soups loop chose the copies; this soup averages what it kept.
            of = f" (the copies the last round of a {pruning.soup} sparse-soup loop kept)"
        return (
            f"This model is a {kind} soup of {_count(merged, 'fine-tuned checkpoint')}{of}.{made}"
        )
    return f"This model is a `{recipe.method}` merge of {_count(merged, 'checkpoint')}.{made}"


# Methods whose recorded parameters are their --param values (Fisher records its Fisher files'
# metadata: its card replays the recipe instead), less what is recorded for readers only (the
# one sign election implemented).
_COMMAND_LINE_METHODS = frozenset(MERGE_METHODS) - {"fisher"}
_RECORDED_ONLY = frozenset({"sign_election"})


def reproduce(recipe: Recipe, out: str) -> dict:
    """The command (or Python call) that rebuilds the weights from the (published) recipe,
    and a note when local folders must be at hand."""
    sources = [*recipe.ingredients, *([recipe.base] if recipe.base else [])]
    local = [source.source for source in sources if hub_id(source) is None]
    note = (
        f"Local ingredients are named by their folder names ({', '.join(f'`{n}`' for n in local)}): "
        "run this in the folder that holds them."
        if local
        else None
    )
    dtype = ["--dtype", recipe.dtype] if recipe.dtype else []
    words = [pinned(source) for source in recipe.ingredients]
    if recipe.command:
        return {"language": "bash", "code": recipe.command, "note": note}
    alpha = recipe.parameters.get("alpha")
    if recipe.patch is not None and isinstance(alpha, (int, float)) and len(words) == 2:
        # The interpolation of the two recorded ends; the sweep only chose alpha.
        command = ["hf-soups", "wise-ft", *words, "--alpha", repr(float(alpha)), *dtype]
        return {"language": "bash", "code": shlex.join([*command, "--out", out]), "note": note}
    weights = recipe.parameters.get("weights")
    pruning = recipe.soup.pruning if recipe.soup is not None else None
    # The command line keeps the ingredients' shared mask by default.
    masks = ["--masks", pruning.masks] if pruning and pruning.masks != "shared" else []
    if recipe.method == "weighted_average" and isinstance(weights, list) and recipe.base is None:
        listed = ",".join(repr(float(w)) for w in weights)
        command = ["hf-soups", "merge", *words, "--weights", listed, *masks, *dtype, "--out", out]
        return {"language": "bash", "code": shlex.join(command), "note": note}
    if recipe.patch is None and recipe.method in _COMMAND_LINE_METHODS:
        base = ["--base", pinned(recipe.base)] if recipe.base else []
        params = [
            word
            for key, value in sorted(recipe.parameters.items())
            if key not in _RECORDED_ONLY
            for word in ("--param", f"{key}={json.dumps(value)}")
        ]
        method = ["--method", recipe.method, *base, *params]
        command = ["hf-soups", "merge", *words, *method, *masks, *dtype, "--out", out]
        return {"language": "bash", "code": shlex.join(command), "note": note}
    code = f"from hf_soups.recipe import replay\n\nreplay({'soup.json'!r}, {out!r})"
    return {"language": "python", "code": code, "note": note}
