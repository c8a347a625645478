"""``transformers.Trainer`` callbacks: SWA, EMA and soup-ingredient collection."""

from hf_soups.callbacks._averaging import AveragedWeights, WeightAveragingCallback, update_bn
from hf_soups.callbacks.ema import EMACallback
from hf_soups.callbacks.ingredients import IngredientCallback
from hf_soups.callbacks.swa import SWACallback

__all__ = [
    "AveragedWeights",
    "EMACallback",
    "IngredientCallback",
    "SWACallback",
    "WeightAveragingCallback",
    "update_bn",
]
