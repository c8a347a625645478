"""What the demo's sparse stage runs and reports: its schedule (:class:`SparseConfig`), a row
per model and the table (accuracy with 95% Wilson intervals, the measured sparsity, the
parameters kept and the forward FLOPs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hf_soups.evaluation import EvalResult
from hf_soups.recipe.schema import PruningRecipe, Score
from hf_soups.report import format_score

REPORTED_SET = "test"
REDUCED_KIND = "reduced"


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
    reduction_parameters: float = 0.2
    reduction_flops: float = 0.25
    """Structured reduction of the image MLPs: the shares of parameters and of forward FLOPs
    to remove (both reached). ``benchmarks/bench_reduction.py`` cut both towers of the fast
    CLIP by 36% of its parameters and 38% of its FLOPs with clean test accuracy inside the
    dense model's interval; the image MLPs alone hold about 29% of the parameters."""
    reduction_step_flops: float = 0.08
    reduction_retrain_steps: int = 40
    reduction_learning_rate: float = 3e-4
    reduction_score_batches: int = 4


def pruning_recipe(config: SparseConfig, kind: str, rounds: list[dict]) -> PruningRecipe:
    """How the sparse soup of ``kind`` was pruned (``rounds``: its round records), for its
    recipe and card."""
    return PruningRecipe(
        method="Sparse Model Soups (Zimmer, Spiegel & Pokutta, ICLR 2024)",
        scorer="magnitude",
        scope=config.scope,
        sparsities=list(config.sparsities),
        copies_per_round=config.copies,
        soup=kind.removeprefix("sparse soup (").removesuffix(")"),
        retraining={
            "epochs": config.retrain_epochs,
            "learning_rate": config.retrain_learning_rate,
            **({"max_steps": config.max_steps} if config.max_steps > 0 else {}),
        },
        rounds=[
            {"sparsity": r["sparsity"], "kept": r["kept"], "copy_scores": r["copy_scores"]}
            for r in rounds
        ],
    )


@dataclass
class SparseRow:
    """One model of the table: its kind, the sparsity aimed at and measured, and its scores."""

    name: str
    kind: str
    target_sparsity: float
    sparsity: float
    parameters: int
    """Dense and reduced rows: all parameters; pruned rows: those not pruned to zero."""
    flops: int
    copies: int
    validation: float
    results: dict[str, EvalResult] = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "parameters": self.parameters,
            "flops": self.flops,
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
    reduction: dict
    """The structured reduction's record (``reduced/reduction.json``)."""

    def table(self) -> str:
        """Accuracy in percent with its 95% Wilson interval, the measured sparsity, the
        parameters kept and the forward FLOPs of one example."""
        sets = list(self.rows[0].results)
        lines = [
            "| model | " + " | ".join(sets) + " | sparsity | parameters | FLOPs |",
            "|" + "---|" * (len(sets) + 4),
        ]
        for row in self.rows:
            cells = [format_score(Score.of(row.results[key]), percent=True) for key in sets]
            size = f"{100 * row.sparsity:.1f}% | {row.parameters:,} | {row.flops:,}"
            lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {size} |")
        return "\n".join(lines)

    def reduction_summary(self) -> str:
        """What the structured reduction removed, and where its accuracy falls against the
        dense model's interval on each set."""
        record = self.reduction
        dense = next(row for row in self.rows if row.kind == "dense")
        reduced = next(row for row in self.rows if row.kind == REDUCED_KIND)
        places = []
        for key, result in reduced.results.items():
            low, high = dense.results[key].intervals["accuracy"]
            value = result.score
            places.append(
                f"{key} {'below' if value < low else 'above' if value > high else 'inside'}"
            )
        widths = record["intermediate_size"]
        return (
            f"Structured reduction: image MLP width {widths['before']['vision']} -> "
            f"{widths['after']['vision']} in {len(record['steps'])} steps, parameters "
            f"-{record['parameters']['reduction']:.1%}, FLOPs -{record['flops']['reduction']:.1%}; "
            f"its accuracy against the dense model's interval: {', '.join(places)}.\n"
        )

    def to_dict(self) -> dict:
        return {
            "rows": [row.to_dict() for row in self.rows],
            "config": asdict(self.config),
            "rounds": self.rounds,
            "saved_soup": self.saved,
            "reduction": self.reduction,
            "seconds": self.seconds,
        }

    def markdown(self) -> str:
        n = self.rows[0].results[REPORTED_SET].n
        protocol = PROTOCOL.format(n=n, **asdict(self.config))
        return f"{protocol}\n{self.table()}\n\n{self.reduction_summary()}"


PROTOCOL = """\
Sparse Model Soups on the demo's tiny CLIP (image tower and visual projection pruned by
magnitude, scope "{scope}"; text tower, text projection and logit scale frozen and dense). Every copy is
retrained {retrain_epochs:g} epoch(s) at learning rate {retrain_learning_rate:g} from the model
before it, seeds differing; the dense model was fine-tuned {dense_epochs:g} epoch(s) from the
pre-trained CLIP. IMP retrains one copy per round; sparse and dense soups {copies} copies per
round. Greedy soups choose on the clean validation split; the test split and its shifted copies
are only reported. The reduced model is the dense one with narrower image MLPs
(`reduce_and_retrain`: Taylor scores on {reduction_score_batches} training batches, steps of
{reduction_step_flops:.0%} of the FLOPs, each retrained {reduction_retrain_steps} steps at learning
rate {reduction_learning_rate:g}) until parameters -{reduction_parameters:.0%} and FLOPs
-{reduction_flops:.0%}. Cells: accuracy in percent with its 95% Wilson interval (n = {n:,} per
set); sparsity is the measured share of zeros among the prunable weights; parameters are all
the model's, less the pruned zeros; FLOPs are those of one image and one class prompt, 2 x the
multiply-accumulates of the matrix products (`hf_soups.pruning.model_counts`; dense kernels,
so the pruned rows cost the dense model's).
"""
