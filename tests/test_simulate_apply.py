"""apply_spec/apply_plan put simulated weights in a model and restore every weight bit-identically."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from coreml_opt.errors import PlanError
from coreml_opt.simulate import SimCache, apply_plan, apply_spec, infer_op_type, simulate, simulate_weight


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.ConvTranspose2d(16, 8, 2), nn.Flatten(),
                         nn.Linear(8 * 7 * 7, 32), nn.Embedding(50, 32))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_restore_after_a_plan_leaves_every_weight_bit_identical():
    model = _model()
    before = _snapshot(model)
    plan = {"0.weight": "pal4/g8", "2.weight": "int4", "4.weight": "prune2:4+pal4+lut8", "5.weight": "int8/asym"}
    with apply_plan(model, plan, cache=SimCache()) as results:
        assert not torch.equal(model[4].weight, before["4.weight"])
        assert torch.equal(model[4].weight, results["4.weight"].weight)
    for key, value in _snapshot(model).items():
        assert torch.equal(value.view(torch.int32) if value.is_floating_point() else value,
                           before[key].view(torch.int32) if value.is_floating_point() else before[key]), key


def test_restore_happens_when_the_trial_raises():
    model = _model()
    before = model[4].weight.detach().clone()
    with pytest.raises(RuntimeError):
        with apply_spec(model, "4.weight", "pal2"):
            raise RuntimeError("evaluation failed")
    assert torch.equal(model[4].weight.view(torch.int32), before.view(torch.int32))


def test_op_type_is_inferred_from_the_module():
    model = _model()
    assert [infer_op_type(model[i]) for i in (0, 2, 4, 5)] == ["conv", "conv_transpose", "linear", "gather"]
    # conv_transpose palettizes per group of *output* channels (axis 1): 8 channels, groups of 4
    with apply_spec(model, "2.weight", "pal2/g4", cache=SimCache()) as result:
        assert result.skipped is None and result.params["lut"].shape[0] == 2


def test_repeated_trials_reuse_the_cached_weight():
    model, cache = _model(), SimCache()
    for _ in range(3):
        with apply_spec(model, "4.weight", "pal4", cache=cache):
            pass
    assert (cache.misses, cache.hits) == (1, 2)
    with apply_spec(model, "4.weight", "pal4", kmeans="fast", cache=cache):
        pass
    assert cache.misses == 2  # the k-means mode is part of the key


def test_unknown_parameter_path_names_the_fix():
    with pytest.raises(PlanError, match="named_parameters"):
        with apply_spec(_model(), "9.weight", "int8"):
            pass


def test_simulate_weight_keeps_the_input_kind_and_values_are_fp16():
    weight = np.random.RandomState(0).randn(24, 40).astype(np.float32)
    out = simulate_weight("int4/block8", weight)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.array_equal(out, out.astype(np.float16).astype(np.float32))
    result = simulate("int4/block8", torch.from_numpy(weight))
    assert np.array_equal(result.weight.numpy(), out)
    assert result.params["scale"].shape == (24, 5)


def test_magnitude_pruning_of_a_large_fp16_weight_prunes_nothing_like_coremltools():
    """np.percentile's fp16 index overflows above 65,519 values; coremltools 9 then keeps every weight."""
    weight = torch.randn(256, 300)
    assert torch.count_nonzero(simulate("prune50", weight).weight) == weight.numel()
    assert torch.count_nonzero(simulate("prune50", weight[:200]).weight) < weight[:200].numel() * 0.51
