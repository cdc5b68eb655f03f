"""Check a written ``.mlpackage`` against the PyTorch model it came from, by running it with the package runtime.

``convert`` calls :func:`check_package` on the package in its temporary path (before it is moved into place),
so a package whose outputs disagree with the torch model on the traced example is never written. Two runs:

- fp32 mode (every op in fp32, weights as stored in fp16) vs the torch model in fp32: max |error| / max
  |torch output| must stay within ``FP32_TOLERANCE``. Measured on the traced example (one sample) of the six
  runtime test models (``tests/runtime_models.py``): digits CNN 3.7e-4, LeNet5 1.5e-4, MobileNetV2-style net
  2.4e-4, EfficientNet-style 2.5e-4, transformer encoder (int ids) 4.3e-4, ConvTranspose/upsample net 2.7e-4
  (fp16 mode: 1.7e-4 .. 1.2e-3). The tolerance, 1e-2, is ~20x the largest, while a wrong fold or a lowering
  error moves outputs by far more (5 % on any one digits CNN weight moves the output by 4e-2 .. 9e-2). Deep
  nets lose more to fp16 weights alone (EfficientNet-Lite0 with ImageNet weights: 6.7e-3 .. 1.05e-2 in torch
  itself, 1.04e-2 in the package), so the tolerance is ``ROUNDING_FACTOR`` times that torch-side error when
  this is larger: the package may differ as much as fp16 storage explains, not more.
- fp16 mode (each op's output rounded to fp16, as the package runs on the GPU/ANE): an output that is inf/NaN
  where the torch output is finite means fp16 activations overflow (|x| > 65504), which the device would show.

An op the runtime does not support, or a runtime failure, skips the check (a warning says why); it never
blocks a conversion.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import ModelError

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-2  # max |package - torch| / max |torch|, fp32-mode runtime on an fp16 package
ROUNDING_FACTOR = 4.0  # deep nets: allow this multiple of the error fp16 weights cause in torch itself


@dataclass
class PackageCheck:
    """Result of one check: ``skipped`` holds the reason when the runtime could not run the package;
    ``errors`` maps output name -> max |error| / max |torch output| (fp32 mode); ``overflow`` lists outputs that
    turn inf/NaN in fp16 mode while torch's are finite."""

    errors: dict[str, float] = field(default_factory=dict)
    overflow: list[str] = field(default_factory=list)
    skipped: str | None = None
    rounding: float = 0.0  # the same error of the torch model with fp16-rounded weights: what fp16 storage explains

    @property
    def tolerance(self) -> float:
        """``FP32_TOLERANCE``, or ``ROUNDING_FACTOR`` times what fp16 weights alone change, if that is more."""
        return max(FP32_TOLERANCE, ROUNDING_FACTOR * self.rounding)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def runtime_reason(exc: BaseException) -> str:
    """Why the package runtime could not run a package, in a few words (the op, not the supported list)."""
    if isinstance(exc, ModelError):
        return exc.problem.split(" (supported: ")[0]
    text = str(exc).strip()
    return f"the package runtime failed ({type(exc).__name__}" + (f": {text.splitlines()[0][:160]})" if text else ")")


def flat_outputs(value: Any) -> list[torch.Tensor]:
    """A torch model's output(s) as a flat list of tensors in traced order (tuple/list/dict values)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flat_outputs(item)]
    return []


def relative_error(package: torch.Tensor, reference: torch.Tensor) -> float:
    """max |package - reference| / max |reference| over the reference's finite values (inf when shapes differ
    or the package is not finite where the reference is; 0 when the reference has no finite value)."""
    package, reference = package.detach().float().cpu(), reference.detach().float().cpu()
    if package.shape != reference.shape:
        return float("inf")
    finite = torch.isfinite(reference)
    if not bool(finite.any()):
        return 0.0
    scale = float(reference[finite].abs().max())
    return float((package[finite] - reference[finite]).abs().max()) / max(scale, 1e-12)


def compare_package(path: str | os.PathLike, model: torch.nn.Module, example: Sequence[torch.Tensor]
                    ) -> PackageCheck:
    """Run the package at ``path`` on ``example`` (its inputs in order) in fp32 and fp16 mode and compare with
    ``model(*example)``; never raises for what the runtime cannot run (``skipped`` says why)."""
    from ..runtime import Executable, load_graph

    result = PackageCheck()
    try:
        graph = load_graph(path)
        from .precision import fp16_copy

        with torch.no_grad():
            expected = flat_outputs(model(*example))
            rounded = flat_outputs(fp16_copy(model)(*example))
        if len(graph.inputs) != len(example) or len(graph.outputs) != len(expected):
            result.skipped = (f"the package has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, the "
                              f"torch model {len(example)} and {len(expected)}")
            return result
        feeds = {port.name: value for port, value in zip(graph.inputs, example)}
        fp32 = Executable(graph, precision="fp32")(feeds)
        fp16 = Executable(graph, precision="fp16")(feeds)
    except Exception as exc:  # an op the runtime lacks, or its own limits: never block a conversion
        result.skipped = runtime_reason(exc)
        return result
    for name, want, want16 in zip(graph.outputs, expected, rounded):
        if not want.is_floating_point():
            result.errors[name] = 0.0 if torch.equal(fp32[name].cpu().long(), want.cpu().long()) else float("inf")
            continue
        result.errors[name] = relative_error(fp32[name], want)
        result.rounding = max(result.rounding, relative_error(want16, want))
        finite = torch.isfinite(want)
        if fp16[name].shape == want.shape and not bool(torch.isfinite(fp16[name].cpu())[finite.cpu()].all()):
            result.overflow.append(name)
    return result


def check_package(path: str | os.PathLike, model: torch.nn.Module, example: Sequence[torch.Tensor],
                  label: str) -> PackageCheck:
    """:func:`compare_package`, raising a one-line ModelError naming ``label`` when the package disagrees with
    the torch model beyond ``FP32_TOLERANCE`` or overflows fp16; logs a warning when the check is skipped."""
    result = compare_package(path, model, example)
    if result.skipped is not None:
        logger.warning("%s: the converted package was not checked against PyTorch: %s", label, result.skipped)
        return result
    worst = max(result.errors, key=result.errors.__getitem__) if result.errors else None
    if worst is not None and not result.errors[worst] <= result.tolerance:
        raise ModelError(label, f"the converted package's output {worst!r} differs from the PyTorch model's on the "
                         f"traced example by {result.errors[worst]:.3g} of its largest value (tolerance "
                         f"{result.tolerance:.3g}: fp16 weights alone change it by {result.rounding:.3g}; fp32 "
                         "package runtime); nothing was written",
                         "report it with the model: coremltools lowered an op differently from PyTorch")
    if result.overflow:
        raise ModelError(label, f"the converted package's output {result.overflow[0]!r} becomes inf/NaN when run "
                         "in fp16 (activations beyond 65504) on the traced example; nothing was written",
                         "scale the activations down (normalise inputs, rescale the layer) or keep the model "
                         "in fp32 (coremltools' compute_precision=FLOAT32)")
    logger.info("%s: package agrees with PyTorch on the traced example (max error %.2g of max |output|)",
                label, result.max_error)
    return result
