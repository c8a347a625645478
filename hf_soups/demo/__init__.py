"""The offline demo: real MNIST digits, a tiny CLIP pre-trained from scratch, a sweep of
fine-tuned ingredients to make soups from, and a multi-task run of vision-only fine-tunes.

Stages, each deterministic for a seed; every model is a plain transformers ``CLIPModel`` (or
``CLIPVisionModel``) folder::

    data = load_demo_data(seed)
    zero_shot = pretrain_zero_shot(out / "zero-shot", data, size, seed)
    ingredients = finetune_sweep(zero_shot, data, out / "ingredients", size, seed)
    multitask = run_multitask(zero_shot, data, out / "multitask", size, seed)
"""

from hf_soups.demo.data import DemoData, load_demo_data
from hf_soups.demo.finetune import finetune_sweep
from hf_soups.demo.multitask import run_multitask
from hf_soups.demo.pretrain import ZeroShotTooWeakError, pretrain_zero_shot

__all__ = [
    "DemoData",
    "ZeroShotTooWeakError",
    "finetune_sweep",
    "load_demo_data",
    "pretrain_zero_shot",
    "run_multitask",
]
