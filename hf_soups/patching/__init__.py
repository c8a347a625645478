"""WiSE-FT and PAINT: interpolate zero-shot and fine-tuned weights, sweep and choose ``alpha``.

- :func:`wise_ft`: ``theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned``,
  in memory or streamed into a model folder (a weighted merge with weights ``(1 - alpha, alpha)``).
- :func:`sweep`: scores per ``alpha`` per eval set, each model formed in memory from one read of
  both endpoints; :class:`TaskSpec` gives a task its own zero-shot head (PAINT).
- :func:`patch` / :func:`choose_wise_ft`: sweep, choose ``alpha`` on held-out data (PAINT's
  rule, or a bound on the loss on supported tasks), and save the chosen model with its curve
  and plot (:class:`PatchResult`).
"""

from hf_soups.patching.interpolation import Endpoints, Interpolation, interpolate, wise_ft
from hf_soups.patching.paint import DEFAULT_ALPHAS, PatchResult, choose_wise_ft, patch
from hf_soups.patching.plots import PLOT_FILE, plot_sweep
from hf_soups.patching.recipe import EvalRecipe, RecipeError, load_eval_recipe, parse_alphas
from hf_soups.patching.selection import AlphaChoice, choose_alpha
from hf_soups.patching.sweep import SweepResult, TaskSpec, sweep

__all__ = [
    "DEFAULT_ALPHAS",
    "PLOT_FILE",
    "AlphaChoice",
    "Endpoints",
    "EvalRecipe",
    "Interpolation",
    "PatchResult",
    "RecipeError",
    "SweepResult",
    "TaskSpec",
    "choose_alpha",
    "choose_wise_ft",
    "interpolate",
    "load_eval_recipe",
    "parse_alphas",
    "patch",
    "plot_sweep",
    "sweep",
    "wise_ft",
]
