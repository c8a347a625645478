"""Tiny Trainer runs for the callback tests: a two-layer classifier, its data, its arguments."""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainingArguments


class TinyNet(nn.Module):
    """A two-layer classifier taking dict batches, optionally with BatchNorm."""

    def __init__(self, batch_norm: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.bn(self.fc1(x))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Vectors(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=generator) * 2 + 0.5
        self.labels = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}


def make_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
