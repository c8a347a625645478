"""The offline demo: real MNIST digits, a tiny CLIP pre-trained from scratch, and a sweep of
fine-tuned ingredients to make soups from.

Stages, each deterministic for a seed::

    data = load_demo_data(seed)
    zero_shot = pretrain_zero_shot(out / "zero-shot", data, size, seed)
    ingredients = finetune_sweep(zero_shot, data, out / "ingredients", size, seed)
"""

from hf_soups.demo.data import DemoData, load_demo_data
from hf_soups.demo.finetune import finetune_sweep
from hf_soups.demo.pretrain import ZeroShotTooWeakError, pretrain_zero_shot

__all__ = [
    "DemoData",
    "ZeroShotTooWeakError",
    "finetune_sweep",
    "load_demo_data",
    "pretrain_zero_shot",
]
