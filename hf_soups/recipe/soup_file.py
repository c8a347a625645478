"""The YAML soup recipe file: parse, check and run it (``hf-soups soup RECIPE.yaml``).

A soup recipe::

    sources:                         # Hub ids (org/name[@revision]) or folders (relative to
      - org/vit-ft-lr1e-5            # this file); or, instead of a list, one sweep folder
      - org/vit-ft-lr3e-5@v1         # whose subfolders hold ingredient.json
      - ./runs/seed2
    method: greedy                   # uniform | greedy | learned | learned_by_layer, or a
                                     # merge method: task_arithmetic | ties | dare_linear |
                                     # dare_ties | model_stock | fisher
    base: org/vit-pretrained         # merge methods on task vectors: the pre-trained model
    parameters: {density: 0.2}       # merge methods: their parameters (fisher_dirs are
                                     # relative to this file)
    held_out:                        # data greedy and learned soups are chosen on
      dataset: data/validation       # a Dataset.save_to_disk folder
      metric: accuracy
    eval_sets:                       # optional: scored for the report, never used to choose
      test: {dataset: data/test}
    greedy: {strict: true, min_gain: 0.0, noise_aware: false, max_size: null}
    learned: {epochs: 5, lr: 0.05, batch_size: 64}
    ensemble: true                   # also score the logit ensemble (N models in memory)
    out: greedy-soup
    overwrite: false
    push_to_hub: {repo_id: me/greedy-soup, private: true}   # optional
    task:                            # CLIP ingredients without a head: a zero-shot task
      classnames: [cat, dog]         # in the order of the datasets' label ids
      templates: openai_imagenet     # a list with {}, or "default" / "openai_imagenet"
      text_model: openai/clip-vit-base-patch32   # vision-only (CLIPVisionModel) ingredients
    weights_format: transformers     # repos holding both formats: transformers | open_clip

Values are checked by type: ``overwrite: 'false'`` (a string) is an error, not ``True``. An
``out`` folder outside the recipe's folder must be given as an absolute path.

Eval set entries take the keys of :mod:`hf_soups.recipe.files`. Merge methods
need no ``held_out`` data; ``eval_sets`` still score them.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from hf_soups.errors import RecipeError
from hf_soups.hub import check_push_access
from hf_soups.methods import BY_NAME
from hf_soups.methods import METHODS as MERGE_METHODS
from hf_soups.models.task import ZeroShotTask
from hf_soups.output import check_output_dir
from hf_soups.recipe.files import load_eval_set, read_recipe_file, resolve_path, zero_shot_task

logger = logging.getLogger(__name__)

SOUP_METHODS = ("uniform", "greedy", "learned", "learned_by_layer")
# The weighted average is what uniform and greedy soups already are.
METHODS = (*SOUP_METHODS, *BY_NAME)
_KEYS = {
    "sources",
    "method",
    "base",
    "parameters",
    "held_out",
    "eval_sets",
    "greedy",
    "learned",
    "ensemble",
    "out",
    "overwrite",
    "push_to_hub",
    "task",
    "weights_format",
}
# Keys whose values must be of one type; a YAML string "false" is not a boolean.
_TYPED_KEYS = {
    "overwrite": bool,
    "ensemble": bool,
    "out": str,
    "base": str,
    "method": str,
    "weights_format": str,
}


def _section(file: Path, raw: Mapping, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{file}: '{key}' must be a mapping")
    return dict(value)


def _check_options(
    file: Path, key: str, options: Mapping, function: Callable, *args, **fixed
) -> None:
    """Refuse options ``function`` does not take, naming the recipe key and the known ones
    (``args`` and ``fixed`` are what the recipe runner passes itself)."""
    signature = inspect.signature(function)
    try:
        signature.bind(*args, **fixed, **options)
    except TypeError as error:
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        known = [
            name
            for name, parameter in list(signature.parameters.items())[len(args) :]
            if parameter.kind not in variadic and name not in fixed
        ]
        raise RecipeError(f"{file}: {key}: {error} (known: {', '.join(known)})") from None


def _source(value: str, base: Path) -> str:
    """A folder relative to the recipe, normalised (it names the ingredient in the recipe and
    the card), or a Hub id as written."""
    resolved = resolve_path(value, base)
    return os.path.normpath(resolved) if Path(resolved).exists() else resolved


def _task(file: Path, raw: Mapping) -> ZeroShotTask | None:
    task = raw.get("task")
    return None if task is None else zero_shot_task(file, "task", task)


def _check_types(file: Path, raw: Mapping) -> None:
    for key, kind in _TYPED_KEYS.items():
        value = raw.get(key)
        if value is not None and type(value) is not kind:
            raise RecipeError(
                f"{file}: '{key}' must be {'true or false' if kind is bool else 'a string'}, "
                f"got {value!r}"
            )
    sources = raw.get("sources")
    if isinstance(sources, list) and not all(isinstance(s, str) for s in sources):
        raise RecipeError(f"{file}: 'sources' must list folders or Hub ids as strings")


def _output_folder(file: Path, raw: Mapping, out: str | None) -> str:
    """``--out``, or the recipe's ``out`` relative to its folder; a relative ``out`` may not
    leave the recipe's folder (a recipe from elsewhere must not aim at the user's files)."""
    if out is not None:
        return out
    if raw.get("out") is None:
        raise RecipeError(f"{file}: no 'out' folder (in the recipe or --out)")
    written = os.path.expanduser(raw["out"])
    if os.path.isabs(written):
        return written
    folder = file.parent.resolve()
    resolved = (folder / written).resolve()
    if not resolved.is_relative_to(folder):
        raise RecipeError(
            f"{file}: out {raw['out']!r} lies outside the recipe's folder; give an absolute path"
        )
    return str(file.parent / written)


def parse_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a soup recipe without loading models or data.

    Returns the recipe's mapping with ``method`` filled in (default ``uniform``).

    Raises:
        RecipeError: naming the file and the key at fault.
    """
    file = Path(path)
    raw = read_recipe_file(file, _KEYS)
    _check_types(file, raw)
    _task(file, raw)
    sources = raw.get("sources")
    if not (isinstance(sources, list) and sources) and not isinstance(sources, str):
        raise RecipeError(
            f"{file}: 'sources' must list the ingredients, or name one sweep folder whose "
            "subfolders hold ingredient.json"
        )
    method = raw.get("method", "uniform")
    if method not in METHODS:
        raise RecipeError(f"{file}: method {method!r} is not one of {', '.join(METHODS)}")
    for key in ("held_out", "eval_sets", "greedy", "learned", "push_to_hub", "parameters"):
        _section(file, raw, key)
    if method in SOUP_METHODS:
        for key in ("base", "parameters"):
            if raw.get(key) is not None:
                raise RecipeError(f"{file}: '{key}' is for merge methods, not method {method!r}")
        if method != "uniform" and raw.get("held_out") is None:
            raise RecipeError(f"{file}: method {method!r} needs 'held_out' data")
    else:
        needs_base = MERGE_METHODS[method].needs_base
        if needs_base and raw.get("base") is None:
            raise RecipeError(f"{file}: method {method!r} needs 'base' (the pre-trained model)")
        if not needs_base and raw.get("base") is not None:
            raise RecipeError(f"{file}: 'base': method {method!r} does not use a base model")
        _check_options(file, "parameters", _section(file, raw, "parameters"), MERGE_METHODS[method])
    for key in ("greedy", "learned"):
        if raw.get(key) is not None and not method.startswith(key):
            raise RecipeError(f"{file}: '{key}' options are for method {key!r}, not {method!r}")
    return {**raw, "method": method}


def run_recipe(path: str | os.PathLike, *, out: str | None = None, overwrite: bool = False):
    """Build, score, save (and optionally push) the soup a recipe describes; returns the Soup."""
    from hf_soups.learned import fit_mixing_coefficients
    from hf_soups.soup import SoupBuilder

    file = Path(path)
    base = file.parent
    raw = parse_recipe(file)
    method = raw["method"]
    out = _output_folder(file, raw, out)
    overwrite = overwrite or raw.get("overwrite", False)
    push = _section(file, raw, "push_to_hub")
    if push:
        # An unreachable Hub or a refused token is found before any work, not after it.
        check_push_access(push["repo_id"], private=push.get("private"), token=push.get("token"))
    held_out = None
    if raw.get("held_out") is not None:
        held_out = load_eval_set(file, "held_out", raw["held_out"], base).evaluator
    eval_sets = {
        # load_eval_set's messages say "eval_sets.<name>" themselves.
        str(name): load_eval_set(file, str(name), spec, base).evaluator
        for name, spec in _section(file, raw, "eval_sets").items()
    }
    sources = raw["sources"]
    builder = SoupBuilder.from_pretrained(
        _source(sources, base)
        if isinstance(sources, str)
        else [_source(str(source), base) for source in sources],
        task=_task(file, raw),
        weights_format=raw.get("weights_format"),
    )
    check_output_dir(out, overwrite, inputs=[i.path for i in builder.ingredients])
    if method == "uniform":
        soup = builder.uniform()
    elif method == "greedy":
        options = _section(file, raw, "greedy")
        _check_options(file, "greedy", options, builder.greedy, held_out)
        soup = builder.greedy(held_out, **options)
    elif method in SOUP_METHODS:
        options = {
            "input_column": held_out.input_column,
            "label_column": held_out.label_column,
            **_section(file, raw, "learned"),
        }
        by_layer = method == "learned_by_layer"
        _check_options(
            file, "learned", options, fit_mixing_coefficients, [], None, by_layer=by_layer
        )
        soup = builder.learned(held_out.dataset, by_layer=by_layer, **options)
    else:
        parameters = _section(file, raw, "parameters")
        if "fisher_dirs" in parameters and isinstance(parameters["fisher_dirs"], list):
            parameters["fisher_dirs"] = [
                resolve_path(str(d), base) for d in parameters["fisher_dirs"]
            ]
        pretrained = _source(str(raw["base"]), base) if raw.get("base") else None
        soup = builder.merge_method(method, base=pretrained, **parameters)
    if raw.get("ensemble"):
        for evaluator in [held_out, *eval_sets.values()]:
            if evaluator is not None:
                builder.ensemble(evaluator)
    if eval_sets:
        builder.evaluate_ingredients(eval_sets)
        soup.evaluate(eval_sets)
    folder = soup.save_pretrained(out, overwrite=overwrite)
    if push:
        from hf_soups.hub import push_folder

        push_folder(folder, push.pop("repo_id"), **push)
    return soup


def load_held_out(path: str | os.PathLike):
    """The Evaluator of a recipe's ``held_out`` eval set (a soup recipe, or a YAML file holding
    only ``held_out``), as ``hf-soups diagnose --recipe`` scores interpolation paths on."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{file}: invalid YAML ({error})") from None
    if not isinstance(raw, Mapping) or raw.get("held_out") is None:
        raise RecipeError(f"{file}: needs a 'held_out' eval set ({{dataset: ..., metric: ...}})")
    return load_eval_set(file, "held_out", raw["held_out"], file.parent).evaluator
