"""A small trained vision transformer for Fashion-MNIST: the transformer of the zoo (``coreml_opt.zoo:fashion_vit``).

Hand-written pre-norm blocks (``nn.Linear`` q/k/v/proj and a GELU MLP, LayerNorm) as in Hugging Face's
ViT, so the attention's activation-by-activation matmuls, LayerNorm weights and a conv patch embedding
all reach conversion, sweeps and plans. Every linear weight dim is a multiple of 32, so ``int4/block32``
and ``pal4/g16`` apply. Data: Debian's ``dataset-fashion-mnist`` (gzipped IDX files).
"""
from __future__ import annotations

import gzip
import logging
import math
import time
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from .errors import DataError

logger = logging.getLogger(__name__)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INPUT_SHAPE: tuple[int, int, int, int] = (1, 1, 28, 28)
# Bump when the architecture, the data subset or the training recipe changes (the cache file carries it).
FASHION_VIT_VERSION = "fashion-vit-v1"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_TRAIN_SUBSET = 20000  # seeded, class-balanced subset of the 60,000 training images
_TRAIN_SEED = 0
_EPOCHS = 5
_BATCH = 128
# Fashion-MNIST pixel mean and std (of x/255 over the training set), applied inside the model.
_MEAN, _STD = 0.2860, 0.3530


def fashion_available(root: Union[str, Path, None] = None) -> bool:
    """True when the four gzipped IDX files of Fashion-MNIST are under ``root`` (default ``FASHION_DIR``)."""
    root = Path(root) if root is not None else FASHION_DIR
    return all((root / name).is_file() for pair in _FILES.values() for name in pair)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    try:
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)
    except (OSError, EOFError) as exc:
        raise DataError(str(path), f"is not a readable gzipped IDX file ({exc})",
                        "reinstall it: apt-get install --reinstall dataset-fashion-mnist") from None


def fashion_mnist(split: str = "test", root: Union[str, Path, None] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000): x float32 (N,1,28,28) in [0,1], y int64.

    Raises DataError (one line) when the Debian package's files are absent."""
    root = Path(root) if root is not None else FASHION_DIR
    if not fashion_available(root):
        raise DataError(str(root), "does not hold the Fashion-MNIST IDX files",
                        "install them: apt-get install -y dataset-fashion-mnist")
    images, labels = (root / name for name in _FILES[split])
    x = _read_idx(images, 16).reshape(-1, 1, 28, 28).astype(np.float32) / np.float32(255.0)
    y = _read_idx(labels, 8).astype(np.int64)
    if len(x) != len(y):
        raise DataError(str(images), f"holds {len(x)} images but {labels.name} {len(y)} labels",
                        "reinstall it: apt-get install --reinstall dataset-fashion-mnist")
    return x, y


def fashion_split(n_train: int = _TRAIN_SUBSET) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): a seeded class-balanced ``n_train`` subset of the training
    set (what the ViT trains on) and the full 10,000-image test set, which it never sees."""
    x_tr, y_tr = fashion_mnist("train")
    rng = np.random.default_rng(_TRAIN_SEED)
    per_class = n_train // 10
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y_tr == c))[:per_class] for c in range(10)]))
    x_te, y_te = fashion_mnist("test")
    return np.ascontiguousarray(x_tr[idx]), y_tr[idx], x_te, y_te


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/proj ``nn.Linear`` layers; (N,L,D) -> (N,L,D)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = (t(x).reshape(n, length, self.heads, self.head_dim).transpose(1, 2)
                   for t in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class FashionViT(nn.Module):
    """ViT for (N,1,28,28) images in [0,1] -> logits (N,10): 7x7 conv patches (16 tokens of 64),
    learned position embedding, 4 blocks (4 heads, MLP 128), mean pooling, LayerNorm and a linear head.

    About 0.14 M parameters; 25 weights above 2048 elements: patch.weight (64,1,7,7), and per block
    q/k/v/proj (64,64) and fc1 (128,64), fc2 (64,128)."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128, patch: int = 7) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (28 // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch((x - _MEAN) * (1.0 / _STD))  # (N, D, 4, 4)
        x = x.flatten(2).transpose(1, 2) + self.pos  # (N, 16, D)
        return self.head(self.norm(self.blocks(x).mean(dim=1)))


def train_fashion_vit() -> FashionViT:
    """Train the ViT from a fixed seed on ``fashion_split``'s subset (AdamW, one-cycle LR), single-threaded
    and deterministic, so every machine gets the same weights; about a minute on one core."""
    from .zoo import deterministic, evaluate_accuracy, fit_classifier

    x_tr, y_tr, x_te, y_te = fashion_split()
    start = time.perf_counter()
    with deterministic():
        torch.manual_seed(_TRAIN_SEED)
        model = FashionViT()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        steps = _EPOCHS * ((len(x_tr) + _BATCH - 1) // _BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
        fit_classifier(model, x_tr, y_tr, opt, sched, _EPOCHS, _BATCH, _TRAIN_SEED,
                       nn.CrossEntropyLoss(label_smoothing=0.05))
    logger.info("trained %s in %.1f s: test accuracy %.4f", FASHION_VIT_VERSION,
                time.perf_counter() - start, evaluate_accuracy(model, x_te, y_te))
    return model
