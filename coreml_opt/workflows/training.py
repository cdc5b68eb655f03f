"""Fine-tuning loop for compressors that train: the user's step, or distillation from the uncompressed model.

Distillation uses the uncompressed (BN-folded) model as the teacher: KL divergence between the
softened outputs at a temperature (scaled by T^2), so it needs no labels; with labels, ``alpha``
mixes in cross-entropy. ``compressor.step()`` runs after every optimizer step (QAT milestones,
pruning schedules, DKM milestones).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..errors import DataError

logger = logging.getLogger(__name__)

TrainStep = Callable[[nn.Module, tuple[torch.Tensor, Optional[torch.Tensor]]], torch.Tensor]


@dataclass
class TrainConfig:
    """How long and how to train: epochs (or a step cap), batch size, learning rate, loss."""

    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-4
    max_steps: Optional[int] = None
    temperature: Optional[float] = None  # distillation temperature; None = labels (or the user's step)
    alpha: float = 0.0  # weight of the label loss when distilling
    train_step: Optional[TrainStep] = None
    seed: int = 0

    def steps(self, samples: int) -> int:
        per_epoch = (samples + self.batch_size - 1) // self.batch_size
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def train(model: nn.Module, compressor: Any, data: Dataset, config: TrainConfig,
          teacher: Optional[nn.Module] = None, progress: bool = True) -> dict[str, float]:
    """Train ``model`` in place for ``config.steps`` steps; returns the first and last loss."""
    if config.train_step is None and config.temperature is None and data.y is None:
        raise DataError(data.source, "has no labels, so fine-tuning needs distillation",
                        "add `distill: {temperature: 2.0}` to the finetune stage, or labels to the data")
    if config.temperature is not None and teacher is None:
        raise ValueError("distillation needs a teacher model")
    from tqdm import tqdm

    total = config.steps(len(data))
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    if teacher is not None:
        teacher.eval()
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc="fine-tune", unit="step", leave=False,
               disable=not progress or not sys.stderr.isatty())
    step = 0
    try:
        while step < total:
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(order), config.batch_size):
                if step >= total:
                    break
                idx = order[start:start + config.batch_size]
                x = data.x[idx]
                y = None if data.y is None else data.y[idx]
                loss = _loss(model, teacher, x, y, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                compressor.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        model.eval()
    logger.info("fine-tuned %d steps: loss %.4f -> %.4f", step, losses[0], losses[-1])
    return {"steps": float(step), "first_loss": losses[0], "last_loss": losses[-1]}


def _loss(model: nn.Module, teacher: Optional[nn.Module], x: torch.Tensor, y: Optional[torch.Tensor],
          config: TrainConfig) -> torch.Tensor:
    if config.train_step is not None:
        loss = config.train_step(model, (x, y))
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError("train_step must return a scalar loss tensor")
        return loss
    out = model(x)
    if config.temperature is None:
        return F.cross_entropy(out, y)
    with torch.no_grad():
        soft = teacher(x)
    loss = distillation_loss(out, soft, config.temperature)
    if config.alpha > 0 and y is not None:
        loss = (1.0 - config.alpha) * loss + config.alpha * F.cross_entropy(out, y)
    return loss
