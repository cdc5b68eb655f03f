"""Where and how a torch model is evaluated: the device (cpu or cuda) and the memory layout.

Conv nets run in channels_last (NHWC): oneDNN's and cuDNN's fast convolution kernels; measured on
EfficientNet-Lite0 (64 photos at 224x224, 2 CPU cores) 6.8 -> 4.0 CPU s a forward pass (2.9 -> 2.0 with
``heap.reused_heap``), inference mode included. The layout changes the float rounding, so every
model one evaluator scores (fp32 reference, fp16 baseline, trials, the coremltools yardstick) runs in the
same layout on the same device, and their metrics stay comparable bit for bit. On CUDA, cuDNN is pinned to
deterministic kernels without TF32 while evaluating, so a trial's metric does not depend on which run or
which path (cached suffix or full forward) computed it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from ..devices import resolve_device  # noqa: F401  (evaluation callers use it from here)

def wants_channels_last(model: nn.Module, batches: Sequence[torch.Tensor]) -> bool:
    """Whether ``model`` is a 2-D conv net fed 4-D float batches (NCHW), which channels_last speeds up."""
    return (bool(batches) and all(x.dim() == 4 and x.is_floating_point() for x in batches)
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


def place_module(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` moved in place to ``device`` (4-D weights in channels_last when asked), in eval mode."""
    if channels_last:
        return model.to(device=device, memory_format=torch.channels_last).eval()
    return model.to(device=device).eval()


def place_batches(batches: Sequence[torch.Tensor], device: torch.device, channels_last: bool) -> list[torch.Tensor]:
    """Input batches on ``device``, NHWC in memory when ``channels_last`` (values and shapes unchanged)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return [x.to(device=device).contiguous(memory_format=layout) for x in batches]


@contextlib.contextmanager
def exact_kernels(device: torch.device, inference: bool = True) -> Iterator[None]:
    """On CUDA deterministic cuDNN kernels, no autotuning and no TF32, for the block; inference mode too unless
    ``inference`` is False (recording activations whose version counters are checked needs plain no_grad)."""
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                           allow_tf32=False))
        stack.enter_context(torch.inference_mode() if inference else torch.no_grad())
        yield
