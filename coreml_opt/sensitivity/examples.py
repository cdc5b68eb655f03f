"""Evaluation data for the example model, usable as ``--data coreml_opt.sensitivity.examples:digits_heldout``."""
from __future__ import annotations

from ..data import Dataset


def digits_heldout() -> Dataset:
    """The held-out 20 % of sklearn digits (360 labelled samples) the example CNN never trained on."""
    from ..zoo import digits_split

    _, _, x_te, y_te = digits_split()
    return Dataset(x_te, y_te, source="digits held-out split")
