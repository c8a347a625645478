"""Zero-shot tasks: the class names and prompt templates that turn a CLIP model into a classifier.

A :class:`ZeroShotTask` is what scoring a CLIP ingredient needs beyond its weights: the head is
built from a text tower (the model's own, or ``text_model``'s for vision-only fine-tunes, as
fusion_bench does) by encoding every template filled with every class name. Tasks are frozen and
JSON-safe (:meth:`ZeroShotTask.to_dict` / :meth:`ZeroShotTask.from_dict`), so recipes record
them and replay them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from hf_soups.errors import ZeroShotTaskError

__all__ = ["DEFAULT_TEMPLATES", "TEMPLATE_SETS", "ZeroShotTask", "template_set"]

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
"""The one-template default: CLIP's own prompt, and what transformers' zero-shot pipeline uses."""

# Registered template sets: name -> packaged JSON file (or the built-in default).
TEMPLATE_SETS: tuple[str, ...] = ("default", "openai_imagenet")


@cache
def template_set(name: str) -> tuple[str, ...]:
    """The templates registered under `name` (see :data:`TEMPLATE_SETS`).

    ``"openai_imagenet"`` is the 80-template ensemble of OpenAI's CLIP ImageNet evaluation
    (shipped in ``hf_soups/models/templates/``); ``"default"`` is :data:`DEFAULT_TEMPLATES`.
    """
    if name == "default":
        return DEFAULT_TEMPLATES
    if name not in TEMPLATE_SETS:
        raise ZeroShotTaskError(
            f"templates: unknown template set {name!r} (registered: {', '.join(TEMPLATE_SETS)})"
        )
    text = resources.files("hf_soups.models").joinpath("templates", f"{name}.json").read_text()
    return tuple(json.loads(text)["templates"])


def _as_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        return template_set(templates)
    found = tuple(templates)
    if not found:
        raise ZeroShotTaskError("templates: empty; a zero-shot head needs at least one template")
    for template in found:
        if not isinstance(template, str):
            raise ZeroShotTaskError(f"templates: {template!r} is not a string")
        # "{}" is what str.format and transformers' hypothesis_template fill; a template
        # without it gives every class the same prompt, hence identical head rows.
        if "{}" not in template:
            raise ZeroShotTaskError(
                f"templates: {template!r} has no '{{}}' placeholder for the class name"
            )
    return found


def _as_classnames(classnames: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classnames, str):
        raise ZeroShotTaskError(f"classnames: give a list of names, not the string {classnames!r}")
    names = tuple(classnames)
    if not names:
        raise ZeroShotTaskError("classnames: empty; a zero-shot head needs at least one class")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name:
            raise ZeroShotTaskError(f"classnames: {name!r} is not a non-empty string")
        if name in seen:
            raise ZeroShotTaskError(f"classnames: {name!r} appears more than once")
        seen.add(name)
    return names


@dataclass(frozen=True)
class ZeroShotTask:
    """Class names and prompt templates for scoring CLIP models as classifiers.

    Args:
        classnames: one name per class, in the order of the dataset's label ids.
        templates: prompt templates with a ``{}`` for the class name, or the name of a
            registered set: ``"default"`` (``("a photo of a {}.",)``, the default) or
            ``"openai_imagenet"`` (OpenAI's 80 ImageNet templates).
        text_model: Hub id (``org/name[@rev]``) or folder of a pre-trained ``CLIPModel`` whose
            text tower, text projection, visual projection and logit scale make the head of
            vision-only ingredients (``CLIPVisionModel`` fine-tunes). Not used for models with
            their own text tower.
        name: the task's name (a dataset name, say), for records and cards.

    Example::

        task = ZeroShotTask(["cat", "dog"], templates="openai_imagenet",
                            text_model="openai/clip-vit-base-patch32")
    """

    classnames: tuple[str, ...]
    templates: tuple[str, ...] = field(default=DEFAULT_TEMPLATES)
    text_model: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so lists and set names become tuples.
        object.__setattr__(self, "classnames", _as_classnames(self.classnames))
        object.__setattr__(self, "templates", _as_templates(self.templates))
        if self.text_model is not None and (
            not isinstance(self.text_model, str) or not self.text_model
        ):
            raise ZeroShotTaskError(f"text_model: {self.text_model!r} is not a Hub id or folder")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        """Every template filled with `classname`."""
        return [template.format(classname) for template in self.templates]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe record; a registered template set is written by its name."""
        templates: str | list[str] = list(self.templates)
        for set_name in TEMPLATE_SETS:
            if self.templates == template_set(set_name):
                templates = set_name
                break
        record: dict[str, Any] = {"classnames": list(self.classnames), "templates": templates}
        if self.text_model is not None:
            record["text_model"] = self.text_model
        if self.name is not None:
            record["name"] = self.name
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ZeroShotTask:
        """Rebuild a task from :meth:`to_dict`'s record (or a recipe's hand-written mapping)."""
        if not isinstance(record, Mapping):
            raise ZeroShotTaskError(f"a zero-shot task must be a mapping, got {record!r}")
        unknown = sorted(set(record) - {"classnames", "templates", "text_model", "name"})
        if unknown:
            raise ZeroShotTaskError(
                f"zero-shot task: unknown key {unknown[0]!r} "
                "(known: classnames, templates, text_model, name)"
            )
        if "classnames" not in record:
            raise ZeroShotTaskError("zero-shot task: no 'classnames'")
        return cls(
            classnames=record["classnames"],
            templates=record.get("templates", "default"),
            text_model=record.get("text_model"),
            name=record.get("name"),
        )
