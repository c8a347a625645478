"""What the demo's sparse stage runs and reports: its schedule (:class:`SparseConfig`), a row
per model and the table (accuracy with 95% Wilson intervals, and the measured sparsity)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hf_soups.evaluation import EvalResult
from hf_soups.recipe.schema import Score
from hf_soups.report import format_score

REPORTED_SET = "test"


@dataclass(frozen=True)
class SparseConfig:
    """The sparse stage's schedule: what every training run and every soup does."""

    copies: int = 3
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9)
    soups: tuple[str, ...] = ("greedy", "uniform")
    """Soup rules of the sparse soups; the first one's last soup is saved."""
    dense_soup: str = "uniform"
    scope: str = "layer"
    """Magnitude pruning per layer: a global threshold pruned the patch embedding whole at 80%
    (its weights are the smallest), leaving the model at chance."""
    dense_epochs: float = 2.0
    dense_learning_rate: float = 1e-3
    retrain_epochs: float = 1.0
    retrain_learning_rate: float = 1e-3
    batch_size: int = 64
    max_steps: int = -1
    """Cut every training run to this many steps (for tests)."""


@dataclass
class SparseRow:
    """One model of the table: its kind, the sparsity aimed at and measured, and its scores."""

    name: str
    kind: str
    target_sparsity: float
    sparsity: float
    copies: int
    validation: float
    results: dict[str, EvalResult] = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "copies_per_round": self.copies,
            "validation_accuracy": self.validation,
            "results": {key: result.to_dict() for key, result in self.results.items()},
        }


@dataclass
class SparseResults:
    """What the sparse stage measured, the soup it saved and how long it took."""

    rows: list[SparseRow]
    config: SparseConfig
    seconds: dict[str, float]
    saved: str
    rounds: dict[str, list[dict]]

    def table(self) -> str:
        """Accuracy in percent with its 95% Wilson interval, and the measured sparsity."""
        sets = list(self.rows[0].results)
        lines = [
            "| model | " + " | ".join(sets) + " | sparsity |",
            "|" + "---|" * (len(sets) + 2),
        ]
        for row in self.rows:
            cells = [format_score(Score.of(row.results[key]), percent=True) for key in sets]
            lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {100 * row.sparsity:.1f}% |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "rows": [row.to_dict() for row in self.rows],
            "config": asdict(self.config),
            "rounds": self.rounds,
            "saved_soup": self.saved,
            "seconds": self.seconds,
        }

    def markdown(self) -> str:
        n = self.rows[0].results[REPORTED_SET].n
        return f"{PROTOCOL.format(n=n, **asdict(self.config))}\n{self.table()}\n"


PROTOCOL = """\
Sparse Model Soups on the demo's tiny CLIP (image tower and visual projection pruned by
magnitude, scope "{scope}"; text tower, text projection and logit scale frozen and dense). Every copy is
retrained {retrain_epochs:g} epoch(s) at learning rate {retrain_learning_rate:g} from the model
before it, seeds differing; the dense model was fine-tuned {dense_epochs:g} epoch(s) from the
pre-trained CLIP. IMP retrains one copy per round; sparse and dense soups {copies} copies per
round. Greedy soups choose on the clean validation split; the test split and its shifted copies
are only reported. Cells: accuracy in percent with its 95% Wilson interval (n = {n:,} per
set); the last column is the measured share of zeros among the prunable weights.
"""
