"""A tiny open_clip model for tests: registered config, offline tokenizer, saved classifiers.

``TINY_OPEN_CLIP`` is registered with open_clip (``open_clip.create_model(TINY_OPEN_CLIP)``
works after :func:`register_tiny_open_clip`); its text tower uses open_clip's bundled BPE
tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch

from hf_soups.models.open_clip import OpenCLIPZeroShotClassifier

TINY_OPEN_CLIP = "hf-soups-tiny-open-clip"
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_CLASSNAMES = ("cat", "dog", "bird")
TINY_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")

_registry_dir: Path | None = None


def register_tiny_open_clip() -> str:
    """Register the tiny config with open_clip (once per process); return its model name."""
    global _registry_dir
    if _registry_dir is None:
        _registry_dir = Path(tempfile.mkdtemp(prefix="hf_soups_open_clip_cfg_"))
        (_registry_dir / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
        open_clip.add_model_config(_registry_dir)
    return TINY_OPEN_CLIP


def tiny_tokenizer():
    """open_clip's bundled (offline) BPE tokenizer at the tiny model's context length."""
    return open_clip.get_tokenizer(register_tiny_open_clip())


def make_tiny_open_clip(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny open_clip CLIP in eval mode."""
    torch.manual_seed(seed)
    return open_clip.create_model(register_tiny_open_clip()).eval()


def make_tiny_open_clip_classifier(
    seed: int = 0,
    classnames: Sequence[str] = TINY_CLASSNAMES,
    templates: Sequence[str] = TINY_TEMPLATES,
) -> OpenCLIPZeroShotClassifier:
    """A tiny open_clip zero-shot classifier with weights drawn from `seed`."""
    return OpenCLIPZeroShotClassifier.from_open_clip(
        make_tiny_open_clip(seed),
        tiny_tokenizer(),
        classnames,
        templates,
        model_cfg=copy.deepcopy(TINY_OPEN_CLIP_CFG),
        progress=False,
    )


def make_tiny_open_clip_folder(
    path: str | Path,
    seed: int = 0,
    classnames: Sequence[str] = TINY_CLASSNAMES,
    templates: Sequence[str] = TINY_TEMPLATES,
) -> Path:
    """Save a tiny open_clip classifier (weights from `seed`) to `path`; return `path`."""
    return make_tiny_open_clip_classifier(seed, classnames, templates).save_pretrained(path)
