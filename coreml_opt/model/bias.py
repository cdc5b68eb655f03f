"""Write corrected biases into an ML Program: each conv/linear op reading a given weight const gets a
new bias const (its own, so a bias coremltools deduplicated between ops is never changed for both),
added where the op had none. Runs as a coremltools graph pass, as ``palettize_weights`` does."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..errors import PlanError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
BIAS_OPS = ("conv", "linear")


def write_biases(mlmodel, deltas: Mapping[str, "torch.Tensor"]):
    """A new MLModel whose ops reading weight const ``name`` (op or var name) add ``deltas[name]`` (O,) to
    their bias, rounded by :func:`coreml_opt.simulate.compensate.corrected_bias` in the weight's precision
    exactly as the simulation does. Raises PlanError when a named weight has no conv/linear reader."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models import utils as model_utils

    from ..simulate.compensate import corrected_bias

    done: set[str] = set()

    class _WriteBiases(AbstractGraphPass):
        def apply(self, prog) -> None:
            for function in prog.functions.values():
                self._block(function)

        def _block(self, block) -> None:
            for op in list(block.operations):
                for inner in op.blocks:
                    self._block(inner)
                if op.op_type not in BIAS_OPS:
                    continue
                producer = op.weight.op
                if producer is None or producer.op_type != "const":
                    continue
                name = producer.name if producer.name in deltas else op.weight.name  # const op or var name
                if name not in deltas:
                    continue
                old = op.bias.op if op.bias is not None else None
                dtype = np.float16 if op.weight.val.dtype == np.float16 else np.float32
                current = op.bias.val if op.bias is not None else None
                value = corrected_bias(current, deltas[name], "fp16" if dtype == np.float16 else "fp32")
                value = value.numpy().astype(dtype)
                with block:
                    new = mb.const(val=value, name=f"{name}_corrected_bias", before_op=op)
                op.set_inputs(bias=new)
                if old is not None and old.op_type == "const" and not old.outputs[0].child_ops:
                    # The bias was this op's alone: the corrected one takes its name (torch mapping kept).
                    old_name = old.name
                    block.remove_ops([old])
                    new.op.name, new.name = old_name, old_name
                done.add(name)

    out = model_utils._apply_graph_pass(mlmodel, _WriteBiases(), spec_version=mlmodel.get_spec().specificationVersion)
    missing = sorted(set(deltas) - done)
    if missing:
        raise PlanError(f"weight {missing[0]!r}", "is read by no conv or linear op, so it has no bias to correct",
                        "drop +bc for this layer")
    logger.info("wrote %d corrected biases", len(done))
    return out
