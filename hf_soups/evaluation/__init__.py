"""Score models and logit ensembles on a dataset, with Accelerate and `evaluate` metrics.

- `metrics`: what `metrics=` accepts, bound to the gathered logits and labels.
- `data`: the dataset or DataLoader read as batches of tensors (Arrow fast path).
- `result`: `EvalResult`, per-example outcomes and intervals, saved and loaded.
- `evaluator`: `Evaluator`, the Accelerate loop.
- `scoring`: `as_scorer`, one adapter for "an Evaluator or a callable model -> score".
"""

from hf_soups.evaluation.evaluator import Evaluator
from hf_soups.evaluation.metrics import METRICS_DIR, MetricLike, MetricsArg, load_metric
from hf_soups.evaluation.result import EvalResult
from hf_soups.evaluation.scoring import Scored, Scorer, ScorerLike, as_scorer, score_fn

__all__ = [
    "METRICS_DIR",
    "EvalResult",
    "Evaluator",
    "MetricLike",
    "MetricsArg",
    "Scored",
    "Scorer",
    "ScorerLike",
    "as_scorer",
    "load_metric",
    "score_fn",
]
