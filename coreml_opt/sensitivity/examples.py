"""Evaluation data for the example model, usable as ``--data coreml_opt.sensitivity.examples:digits_heldout``."""
from __future__ import annotations

from ..data import Dataset


def digits_heldout() -> Dataset:
    """The held-out 20 % of sklearn digits (360 labelled samples) the example CNN never trained on."""
    from ..zoo import digits_split

    _, _, x_te, y_te = digits_split()
    return Dataset(x_te, y_te, source="digits held-out split")


def digits_plan_half() -> Dataset:
    """The even samples of the held-out split (180): the half a sweep and plan see."""
    from ..zoo import digits_split

    _, _, x_te, y_te = digits_split()
    return Dataset(x_te[0::2], y_te[0::2], source="digits held-out split, plan half (even samples)")


def digits_report_half() -> Dataset:
    """The odd samples of the held-out split (180): never planned on, to report on."""
    from ..zoo import digits_split

    _, _, x_te, y_te = digits_split()
    return Dataset(x_te[1::2], y_te[1::2], source="digits held-out split, report half (odd samples)")


def fashion_heldout() -> Dataset:
    """The first 1,000 Fashion-MNIST test images (never trained on) for the zoo's ViT; DataError when absent."""
    from ..fashion_vit import fashion_mnist

    x, y = fashion_mnist("test")
    return Dataset(x[:1000], y[:1000], source="Fashion-MNIST test[:1000]")


def photos_plan_half() -> Dataset:
    """128 real photo crops at 224×224 (EfficientNet-Lite normalised) to sweep and plan on."""
    from ..photos import photo_halves

    return photo_halves()[0]


def photos_report_half() -> Dataset:
    """The other 128 crops of the same photos, never planned on, to report on."""
    from ..photos import photo_halves

    return photo_halves()[1]
