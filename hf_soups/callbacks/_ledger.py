"""Which weights the model holds, and which weights each evaluation saw, during one training run.

Callbacks that swap weights into the model (SWA, EMA, WiSE-FT) and the one that saves the model
with its eval metrics (:class:`~hf_soups.callbacks.IngredientCallback`) must agree on this, but
the Trainer hands its callbacks no list of one another. The one object every callback of a
``Trainer.train()`` call shares is that call's ``TrainerState`` (a fresh one per call, also on
resume), so the record hangs on it, under an attribute that ``TrainerState.save_to_json`` (which
writes dataclass fields only) leaves out of checkpoints. Callbacks run in list order, so at any
event the ledger says what the callbacks listed before have done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainerState

from hf_soups.errors import CallbackConflictError

_ATTRIBUTE = "_hf_soups_weights_ledger"
#: ``Weights.source`` of the weights the optimizer produced (as opposed to a callback's).
TRAINING = "training weights"


@dataclass(frozen=True)
class Weights:
    """One set of weights a model held: ``source`` (:data:`TRAINING`, or what a callback made of
    them) at optimizer step ``step``."""

    source: str
    step: int

    @property
    def is_training(self) -> bool:
        return self.source == TRAINING

    def describe(self) -> str:
        return f"{self.source} at step {self.step}"


@dataclass
class WeightsLedger:
    """What the callbacks of one training run have done to the model's weights so far."""

    end_swaps: list[str] = field(default_factory=list)
    """Callbacks that will load their weights into the model when training ends, in list order."""
    evaluated: dict[int, Weights] = field(default_factory=dict)
    """Evaluations at a step that did not see the training weights of that step."""
    loaded: Weights | None = None
    """Weights a callback loaded into the model at the end of training (``None``: as trained)."""

    def claim_end_swap(self, name: str, *, builds_on_earlier: bool) -> None:
        """Record that callback ``name`` loads weights into the model when training ends.

        Args:
            builds_on_earlier: The callback's weights are made from whatever the model holds
                when its turn comes (WiSE-FT interpolates from them), so an earlier swap feeds
                it rather than being lost. Otherwise (SWA, EMA: an average of the training
                weights) an earlier swap would be silently overwritten, which is refused.

        Raises:
            CallbackConflictError: naming both callbacks.
        """
        if self.end_swaps and not builds_on_earlier:
            raise CallbackConflictError(
                f"{self.end_swaps[-1]} and {name} both load their weights into the model when "
                f"training ends, and {name}'s would silently replace {self.end_swaps[-1]}'s: set "
                "swap_at_end=False on one of them (save_dir still writes its average)"
            )
        self.end_swaps.append(name)

    def weights_evaluated_at(self, step: int) -> Weights:
        """The weights the evaluation logged at ``step`` saw."""
        return self.evaluated.get(step, Weights(TRAINING, step))

    def weights_held(self, step: int) -> Weights:
        """The weights the model holds now, training having reached ``step``."""
        return self.loaded if self.loaded is not None else Weights(TRAINING, step)


def weights_ledger(state: TrainerState) -> WeightsLedger:
    """The ledger of the training run ``state`` belongs to (created on first use)."""
    ledger = getattr(state, _ATTRIBUTE, None)
    if ledger is None:
        ledger = WeightsLedger()
        setattr(state, _ATTRIBUTE, ledger)
    return ledger
