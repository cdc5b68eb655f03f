"""The torch device a user names for evaluation (``--device``, a sweep file's ``device:``, ``device=``), checked.

One line names the device and the fix when it is unknown or absent (a CPU-only torch asked for ``cuda``),
instead of torch's traceback from deep inside the first forward pass.
"""
from __future__ import annotations

import torch

from .errors import ModelError

DEVICES: tuple[str, ...] = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a torch device; ModelError in one line when it is absent."""
    text = "cpu" if device is None else str(device)
    try:
        found = torch.device(text)
    except (RuntimeError, TypeError):
        found = None
    if found is None or found.type not in DEVICES:
        raise ModelError(f"device {text!r}", f"is not one of {list(DEVICES)}", "use --device cpu or --device cuda")
    if found.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {text!r}", f"is not available: torch {torch.__version__} sees no CUDA GPU",
                             "use --device cpu, or run on a machine with a GPU and a CUDA build of torch")
        if found.index is not None and found.index >= torch.cuda.device_count():
            raise ModelError(f"device {text!r}", f"does not exist: torch sees {torch.cuda.device_count()} GPU(s)",
                             "use --device cuda (the first GPU)")
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {text!r}", f"is not available: torch {torch.__version__} sees no Apple GPU",
                         "use --device cpu")
    return found
