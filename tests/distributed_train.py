"""Train a tiny ViT with SWA and EMA callbacks; run alone or under ``accelerate launch``.

Used by tests/test_callbacks.py: once with ``accelerate launch --multi_gpu --num_processes 2``
(CPU, gloo) at half the per-device batch, once in-process with the full batch, and the averaged
weights of both are compared. Each rank writes its own averages to ``<out>/rank<r>-<kind>.safetensors``
and the names of the model folders it wrote (via save_pretrained) to ``<out>/rank<r>-saves.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from hf_soups.callbacks import EMACallback, SWACallback

GLOBAL_BATCH = 8
MAX_STEPS = 6
N_EXAMPLES = GLOBAL_BATCH * MAX_STEPS


class RandomImages(torch.utils.data.Dataset):
    """Deterministic random images and labels, as dict examples the Trainer collates."""

    def __init__(self, n: int, image_size: int = 16, num_labels: int = 4, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(n, 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_labels, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def tiny_vit_config(image_size: int = 16, num_labels: int = 4) -> ViTConfig:
    return ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config())


def train(out: Path, per_device_batch: int) -> dict[str, dict[str, torch.Tensor]]:
    """Train with SWA and EMA; return this rank's averaged tensors by callback kind."""
    out = Path(out)
    model = tiny_vit()
    swa = SWACallback(swa_start=2, every_n_steps=2, save_dir=out / "swa-model")
    ema = EMACallback(decay=0.8, swap_at_end=False, save_dir=out / "ema-model")
    args = TrainingArguments(
        output_dir=str(out / "run"),
        use_cpu=True,
        per_device_train_batch_size=per_device_batch,
        max_steps=MAX_STEPS,
        learning_rate=0.05,
        optim="sgd",
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=RandomImages(N_EXAMPLES), callbacks=[swa, ema]
    )
    saves: list[str] = []
    save_pretrained = model.save_pretrained

    def recording_save_pretrained(directory, *a, **k):
        saves.append(Path(directory).name)
        return save_pretrained(directory, *a, **k)

    model.save_pretrained = recording_save_pretrained
    trainer.train()
    rank = args.process_index
    averages = {"swa": swa.averaged_state_dict(), "ema": ema.averaged_state_dict()}
    for kind, tensors in averages.items():
        save_file(
            {k: v.cpu().contiguous() for k, v in tensors.items()},
            out / f"rank{rank}-{kind}.safetensors",
        )
    info = {
        "world_size": args.world_size,
        "saves": saves,
        "n_averaged": [swa.n_averaged, ema.n_averaged],
    }
    if torch.distributed.is_initialized():
        info["backend"] = torch.distributed.get_backend()
        info["dist_world_size"] = torch.distributed.get_world_size()
    (out / f"rank{rank}-info.json").write_text(json.dumps(info))
    return averages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-device-batch", type=int, required=True)
    cli = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(cli.out, cli.per_device_batch)


if __name__ == "__main__":
    main()
