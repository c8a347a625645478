"""``transformers.Trainer`` callbacks: SWA, EMA, soup-ingredient collection, WiSE-FT and
iterative magnitude pruning."""

from hf_soups.callbacks._averaging import WeightAveragingCallback
from hf_soups.callbacks._batchnorm import update_bn
from hf_soups.callbacks._weights import AveragedWeights
from hf_soups.callbacks.ema import EMACallback
from hf_soups.callbacks.ingredients import IngredientCallback
from hf_soups.callbacks.pruning import IterativeMagnitudePruningCallback
from hf_soups.callbacks.swa import SWACallback
from hf_soups.callbacks.wise_ft import WiSEFTCallback

__all__ = [
    "AveragedWeights",
    "EMACallback",
    "IngredientCallback",
    "IterativeMagnitudePruningCallback",
    "SWACallback",
    "WeightAveragingCallback",
    "WiSEFTCallback",
    "update_bn",
]
