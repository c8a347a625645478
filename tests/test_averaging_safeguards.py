"""Averaging callbacks that do not undo training, do not fight, and do not mislabel metrics.

EMA: the share of the first averaged weights after N updates, by hand (a product of decays
written out here), against what the callback's average holds when the weights are 1 at that
step and 0 at every other. SWA with a skipped optimizer step against AveragedModel fed only the
steps that were not skipped. Ingredient metrics against the loss of the saved weights computed
here with a plain forward pass. Conflicting end-of-training swaps refused before any step.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from distributed_train import RandomImages, tiny_vit
from tiny_training import TinyNet, Vectors, make_args, max_difference
from torch.optim.swa_utils import AveragedModel
from transformers import Trainer, TrainerCallback, ViTForImageClassification

from hf_soups.callbacks import EMACallback, IngredientCallback, SWACallback, WiSEFTCallback
from hf_soups.errors import CallbackConflictError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- EMA: how much of the start is left -----------------------------------------------------


class MarkOneStep(torch.optim.Optimizer):
    """Sets every parameter to 1 after optimizer step ``marked`` and to 0 after every other.

    An exponential average of such weights holds, in every entry, exactly the share of the
    weights of step ``marked`` in the average.
    """

    def __init__(self, params, marked: int) -> None:
        super().__init__(params, {"lr": 1.0})
        self.marked = marked
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.steps += 1
        for group in self.param_groups:
            for parameter in group["params"]:
                parameter.fill_(1.0 if self.steps == self.marked else 0.0)


def timm_v3_decay(update: int, decay, use_warmup, update_after_step=0, gamma=1.0, power=2 / 3):
    """timm ModelEmaV3.get_decay, as written there (min_decay 0)."""
    step = max(0, update - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        return min(1 - (1 + step / gamma) ** -power, decay)
    return decay


def run_marked(tmp_path, ema: EMACallback, steps: int, marked: int) -> torch.Tensor:
    model = TinyNet()
    optimizer = MarkOneStep(model.parameters(), marked)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    Trainer(
        model=model,
        args=make_args(tmp_path, max_steps=steps),
        train_dataset=Vectors(4 * steps),
        optimizers=(optimizer, schedule),
        callbacks=[ema],
    ).train()
    assert optimizer.steps == steps
    return torch.cat([t.flatten() for t in ema.averaged_state_dict().values()])


@pytest.mark.parametrize(
    ("settings", "schedule", "marked", "warns"),
    [
        # The defaults: timm's warm-up, gamma 1, power 2/3, capped at 0.9999.
        (dict(), dict(decay=0.9999, use_warmup=True), 1, False),
        # The case: constant 0.9999 keeps 95% of the start after 500 steps.
        (dict(use_warmup=False), dict(decay=0.9999, use_warmup=False), 1, True),
        # Copies until update 4: the average starts from the weights of step 4.
        (
            dict(decay=0.999, use_warmup=False, update_after_step=3),
            dict(decay=0.999, use_warmup=False, update_after_step=3),
            4,
            True,
        ),
        (dict(decay=0.98, use_warmup=False), dict(decay=0.98, use_warmup=False), 1, False),
    ],
)
def test_ema_share_of_the_first_weights_after_n_steps(
    tmp_path, caplog, settings, schedule, marked, warns
):
    steps = 500
    ema = EMACallback(**settings)
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        held = run_marked(tmp_path, ema, steps, marked)

    by_hand = 1.0
    for update in range(marked + 1, steps + 1):
        by_hand *= timm_v3_decay(update, **schedule)
    # Every entry of the average is the share of the marked step's weights.
    expected = torch.full_like(held, by_hand, dtype=torch.float64)
    assert torch.allclose(held.double(), expected, rtol=1e-4, atol=0.0)
    assert ema.first_weights_share(steps) == pytest.approx(by_hand, rel=1e-9)
    warnings = [r for r in caplog.records if "EMACallback" in r.getMessage()]
    if warns:
        assert by_hand > 0.1
        assert len(warnings) == 1
        assert f"{100 * by_hand:.1f}%" in warnings[0].getMessage()
    else:
        assert by_hand < 0.1 and warnings == []


def test_ema_defaults_forget_the_start_of_a_short_fine_tune():
    # 1 - (1 + k)^(-2/3) for k = 1..499, multiplied out: the start is gone after 500 steps.
    share = 1.0
    for k in range(1, 500):
        share *= 1 - (1 + k) ** (-2 / 3)
    ema = EMACallback()
    assert ema.use_warmup and ema.decay == 0.9999 and ema.warmup_power == pytest.approx(2 / 3)
    assert ema.first_weights_share(500) == pytest.approx(share, rel=1e-9)
    assert share < 1e-6


# ---- SWA: skipped optimizer steps -----------------------------------------------------------


class InfiniteLossAt(TrainerCallback):
    """Make the training loss of optimizer step ``step`` infinite, so its gradients are not
    finite and a GradScaler skips that step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.loss_factor = float("inf") if state.global_step + 1 == self.step else 1.0


class ScaledLossNet(TinyNet):
    loss_factor = 1.0

    def forward(self, x, labels=None):
        output = super().forward(x, labels)
        if self.training:
            output["loss"] = output["loss"] * self.loss_factor
        return output


class WeightsAtStepEnd(TrainerCallback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.skipped: list[int] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer.step_was_skipped:
            self.skipped.append(state.global_step + 1)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }


@pytest.mark.parametrize(
    ("optim", "accelerate_reports_the_skip"),
    # GradScaler runs fused AdamW's step, which skips inside: accelerate does not see that skip.
    [("adamw_torch_fused", False), ("adamw_torch", True)],
)
def test_swa_does_not_average_skipped_steps(tmp_path, optim, accelerate_reports_the_skip):
    swa = SWACallback(swa_start=2, swap_at_end=False)
    ema = EMACallback(decay=0.9, use_warmup=False, swap_at_end=False)
    recorder = WeightsAtStepEnd()
    trainer = Trainer(
        model=ScaledLossNet(),
        args=make_args(tmp_path, max_steps=8, optim=optim),
        train_dataset=Vectors(32),
        callbacks=[InfiniteLossAt(5), swa, ema, recorder],
    )
    # What accelerate sets up for fp16 on a GPU (it refuses fp16 on CPU): a GradScaler scaling
    # the loss in backward and stepping the optimizer.
    scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()

    # One back-off of the scale: the scaler found non-finite gradients once and skipped.
    assert scaler.get_scale() == 2.0**16 * scaler.get_backoff_factor()
    assert recorder.skipped == ([5] if accelerate_reports_the_skip else [])
    # The skipped step left the weights as they were, as a real skip does.
    assert max_difference(recorder.weights[5], recorder.weights[4]) == 0.0
    assert max_difference(recorder.weights[6], recorder.weights[5]) > 1e-4

    def averaged_model(steps):
        reference = AveragedModel(TinyNet(seed=1))
        holder = TinyNet(seed=2)
        for step in steps:
            holder.load_state_dict(recorder.weights[step])
            reference.update_parameters(holder)
        return {name: p.detach() for name, p in reference.module.named_parameters()}

    expected = averaged_model([2, 3, 4, 6, 7, 8])
    assert swa.n_averaged == 6
    assert max_difference(swa.averaged_state_dict(), expected) < 1e-6
    # Counting step 5 would have given weights of step 4 twice the weight: a visible difference.
    assert max_difference(averaged_model([2, 3, 4, 5, 6, 7, 8]), expected) > 1e-5
    # EMA, as timm and diffusers do, updates after every optimizer step.
    assert ema.n_averaged == 8


# ---- two callbacks that would both load weights at the end ----------------------------------


def _trainer(tmp_path, callbacks, model=None, **arguments):
    return Trainer(
        model=model if model is not None else TinyNet(),
        args=make_args(tmp_path, **{"max_steps": 4, **arguments}),
        train_dataset=Vectors(16),
        callbacks=callbacks,
    )


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("order", ["ema-first", "swa-first"])
def test_two_averages_loaded_at_the_end_are_refused_before_training(tmp_path, order):
    ema, swa = EMACallback(), SWACallback(swa_start=2)
    counter = CountSteps()
    callbacks = [ema, swa] if order == "ema-first" else [swa, ema]
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, [*callbacks, counter], model=model)
    with pytest.raises(CallbackConflictError, match="EMACallback") as raised:
        trainer.train()
    assert "SWACallback" in str(raised.value) and "swap_at_end=False" in str(raised.value)
    assert counter.steps == 0
    assert max_difference(model.state_dict(), before) == 0.0


def test_wise_ft_before_an_average_loaded_at_the_end_is_refused(tmp_path):
    trainer = _trainer(
        tmp_path,
        [WiSEFTCallback({"count": len}, alphas=[0.5]), EMACallback()],
        model=tiny_vit(),
    )
    trainer.train_dataset = RandomImages(16)
    with pytest.raises(CallbackConflictError, match="WiSEFTCallback and EMACallback"):
        trainer.train()


def test_an_average_saved_beside_one_loaded_at_the_end_still_works(tmp_path):
    ema = EMACallback(decay=0.5, swap_at_end=False, save_dir=tmp_path / "ema")
    swa = SWACallback(swa_start=2)
    model = tiny_vit()
    trainer = _trainer(tmp_path / "run", [ema, swa], model=model)
    trainer.train_dataset = RandomImages(16)
    trainer.train()
    live = {name: p.detach() for name, p in model.named_parameters()}
    # The model ends with SWA's average, the EMA folder holds EMA's.
    assert max_difference(live, swa.averaged_state_dict()) == 0.0
    saved = ViTForImageClassification.from_pretrained(tmp_path / "ema")
    ema_average = {n: ema.averaged_state_dict()[n] for n, _ in saved.named_parameters()}
    assert max_difference(dict(saved.named_parameters()), ema_average) < 1e-7
    assert max_difference(ema_average, swa.averaged_state_dict()) > 1e-4


# ---- ingredient.json metrics describe the saved weights -------------------------------------


def eval_loss_by_hand(folder, data: RandomImages) -> float:
    """Mean cross-entropy of the saved model over ``data``, with one plain forward pass."""
    model = ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(pixel_values=data.pixel_values).logits
    return torch.nn.functional.cross_entropy(logits, data.labels).item()


@pytest.mark.parametrize(
    ("ingredient_first", "evaluate_with_average", "metrics_are_the_ingredients"),
    [
        (False, False, False),  # the average is swapped in after an evaluation of training weights
        (False, True, True),  # the last evaluation saw that very average
        (True, False, True),  # the training weights are saved before the swap, and were evaluated
        (True, True, False),  # the training weights are saved, the average was evaluated
    ],
)
def test_ingredient_metrics_describe_the_saved_weights(
    tmp_path, caplog, ingredient_first, evaluate_with_average, metrics_are_the_ingredients
):
    swa = SWACallback(swa_start=2, evaluate_with_average=evaluate_with_average)
    ingredient = IngredientCallback(sweep_dir=tmp_path / "sweep", name="run")
    eval_data = RandomImages(8, seed=3)
    trainer = Trainer(
        model=tiny_vit(),
        args=make_args(
            tmp_path / "run",
            max_steps=6,
            learning_rate=3e-2,
            eval_strategy="steps",
            eval_steps=6,
            per_device_eval_batch_size=4,
        ),
        train_dataset=RandomImages(24),
        eval_dataset=eval_data,
        callbacks=[ingredient, swa] if ingredient_first else [swa, ingredient],
    )
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        trainer.train()

    folder = tmp_path / "sweep" / "run"
    record = json.loads((folder / "ingredient.json").read_text())
    logged = next(e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e)
    saved_loss = eval_loss_by_hand(folder, eval_data)
    swapped = not ingredient_first
    assert record["weights"] == (
        "SWACallback's average of 5 weight sets at step 6"
        if swapped
        else "training weights at step 6"
    )
    # The logged loss is not that of the saved weights whenever it is set aside.
    assert (abs(logged - saved_loss) < 1e-5) == metrics_are_the_ingredients
    if metrics_are_the_ingredients:
        assert record["metrics"]["eval_loss"] == pytest.approx(saved_loss, rel=1e-5)
        assert record["metrics_step"] == 6 and "metrics_of_other_weights" not in record
    else:
        assert record["metrics"] == {} and record["metrics_step"] is None
        other = record["metrics_of_other_weights"]
        assert other["step"] == 6 and other["metrics"]["eval_loss"] == pytest.approx(logged)
        assert other["weights"] == (
            "training weights at step 6"
            if swapped
            else "SWACallback's average of 5 weight sets at step 6"
        )
        assert "metrics_of_other_weights" in caplog.text


def test_wise_ft_after_an_average_interpolates_from_it(tmp_path):
    model = tiny_vit()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    swa = SWACallback(swa_start=2)
    wise_ft = WiSEFTCallback({"constant": lambda scored: 0.0}, alphas=[0.5])
    ingredient = IngredientCallback(sweep_dir=tmp_path / "sweep", name="run")
    trainer = _trainer(tmp_path / "run", [swa, wise_ft, ingredient], model=model)
    trainer.train_dataset = RandomImages(16)
    trainer.train()

    # By hand: half the starting weights plus half SWA's average of steps 2, 3 and 4.
    average = swa.averaged_state_dict()
    expected = {k: 0.5 * start[k].double() + 0.5 * average[k].double() for k in average}
    live = {k: v.detach() for k, v in model.state_dict().items() if k in expected}
    assert max_difference(live, expected) < 1e-6
    record = json.loads((tmp_path / "sweep" / "run" / "ingredient.json").read_text())
    assert record["weights"] == (
        "WiSE-FT interpolation at alpha=0.5 between the starting weights and the "
        "SWACallback's average of 3 weight sets at step 4"
    )


def test_ingredient_metrics_of_several_eval_sets_half_on_the_average_are_set_aside(tmp_path):
    # Only the first eval dataset is evaluated on the swapped-in average (the Trainer fires one
    # on_evaluate per dataset): the metrics logged at the step mix two sets of weights.
    swa = SWACallback(swa_start=2, evaluate_with_average=True)
    ingredient = IngredientCallback(sweep_dir=tmp_path / "sweep", name="run")
    sets = {"a": RandomImages(8, seed=3), "b": RandomImages(8, seed=4)}
    trainer = Trainer(
        model=tiny_vit(),
        args=make_args(
            tmp_path / "run",
            max_steps=6,
            learning_rate=3e-2,
            eval_strategy="steps",
            eval_steps=6,
            per_device_eval_batch_size=4,
        ),
        train_dataset=RandomImages(24),
        eval_dataset=sets,
        callbacks=[swa, ingredient],
    )
    trainer.train()
    folder = tmp_path / "sweep" / "run"
    record = json.loads((folder / "ingredient.json").read_text())
    logged = trainer.state.log_history
    logged_a = next(e["eval_a_loss"] for e in logged if "eval_a_loss" in e)
    logged_b = next(e["eval_b_loss"] for e in logged if "eval_b_loss" in e)
    # By hand: set a was scored on the saved average, set b on other weights.
    assert logged_a == pytest.approx(eval_loss_by_hand(folder, sets["a"]), rel=1e-5)
    assert abs(logged_b - eval_loss_by_hand(folder, sets["b"])) > 1e-4
    assert record["metrics"] == {} and record["metrics_step"] is None
    assert record["metrics_of_other_weights"]["weights"] == (
        "SWACallback's average of 5 weight sets on the first eval dataset, training weights "
        "on the others at step 6"
    )
