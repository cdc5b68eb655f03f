"""Fidelity on real weights: the example digits CNN compressed by coremltools vs the simulation."""
from __future__ import annotations

import numpy as np
import pytest

from coreml_opt.determinism import single_threaded
from coreml_opt.model.convert import fold_batchnorm
from coreml_opt.simulate import infer_op_type, simulate
from coreml_opt.spec import parse_spec

from test_simulate_helpers import decompressed_weights

WEIGHT_THRESHOLD = 2048


def _compress_whole_model(mlmodel, spec):
    import coremltools.optimize.coreml as cto

    for i, step in enumerate(spec.parts):
        op_config = step.coreml_config(weight_threshold=WEIGHT_THRESHOLD)
        config = cto.OptimizationConfig(global_config=op_config)
        with single_threaded():  # as compress() runs it: scikit-learn's k-means depends on the thread count
            if step.technique in ("quantize", "lut"):
                mlmodel = cto.linear_quantize_weights(mlmodel, config, joint_compression=i > 0)
            elif step.technique == "palettize":
                mlmodel = cto.palettize_weights(mlmodel, config, joint_compression=i > 0)
            else:
                mlmodel = cto.prune_weights(mlmodel, config, joint_compression=i > 0)
    return mlmodel


@pytest.mark.parametrize("spec_text", ["int8", "int4/block32", "uint8/asym", "pal4", "pal4/g16", "pal3/uniform",
                                       "pal2/g16/vec2", "prune50", "prune2:4", "prune2:4+pal4", "pal4+lut8"])
def test_example_model_weights_match_coremltools(spec_text, digits_model, example_conversion):
    spec = parse_spec(spec_text)
    folded = fold_batchnorm(digits_model)
    emitted = decompressed_weights(_compress_whole_model(example_conversion.mlmodel, spec))
    checked = 0
    for const_name, value in emitted.items():
        owner = max((c for c in example_conversion.mapping if const_name.startswith(c)), key=len, default=None)
        if owner is None:
            continue
        path = example_conversion.mapping[owner]
        weight = folded.get_parameter(path).detach()
        op_type = infer_op_type(folded.get_submodule(path.rpartition(".")[0]))
        if weight.numel() > WEIGHT_THRESHOLD:
            expected = simulate(spec, weight, op_type).weight.numpy()
            checked += 1
        else:
            expected = weight.half().float().numpy()
        assert np.array_equal(expected, value.astype(np.float32)), f"{spec_text}: {path} ({const_name})"
    assert checked >= 5
