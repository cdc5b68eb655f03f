"""ChunkSimulator: palettes on worker threads, a layer's trials together, deadlines and errors."""
from __future__ import annotations

import time

import pytest
import torch

from coreml_opt.sensitivity.chunks import ChunkSimulator
from coreml_opt.sensitivity.layers import Layer
from coreml_opt.simulate import SimCache, simulate
from coreml_opt.spec import parse_spec


class _CountingCache(SimCache):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def get(self, spec, weight, op_type, kmeans="exact", precision="fp16"):
        self.calls.append(str(spec))
        return super().get(spec, weight, op_type, kmeans, precision)


def _trials(specs: str, n_layers: int = 2):
    gen = torch.Generator().manual_seed(0)
    layers = [Layer(f"l{i}.weight", f"l{i}", "linear", (64, 200), 12_800, 25_600) for i in range(n_layers)]
    weights = {layer.layer: (torch.randn(64, 200, generator=gen) * 0.05).half().float() for layer in layers}
    return [(layer, parse_spec(s)) for layer in layers for s in specs.split(",")], weights


def test_every_trial_is_simulated_as_the_engine_would():
    trials, weights = _trials("int8,pal4,pal2")
    cache = _CountingCache()
    sim = ChunkSimulator(trials, weights, cache, "exact")
    try:
        for i in range(len(trials)):
            sim.wait(i)
    finally:
        sim.close()
    assert sorted(cache.calls) == sorted(str(s) for _, s in trials)
    for layer, spec in trials:
        cached = cache.get(spec, weights[layer.layer], layer.op_type)
        assert torch.equal(cached.weight, simulate(spec, weights[layer.layer], layer.op_type).weight)


def test_past_the_deadline_workers_stop_and_the_waited_trial_still_comes():
    trials, weights = _trials("pal6,pal4,pal2", n_layers=3)
    cache = _CountingCache()
    sim = ChunkSimulator(trials, weights, cache, "exact", deadline=time.perf_counter() - 1)
    try:
        sim.wait(4)
    finally:
        sim.close()
    assert cache.calls == [str(trials[4][1])]


class _FailingCache(SimCache):
    def get(self, spec, weight, op_type, kmeans="exact", precision="fp16"):
        if str(spec) == "pal2":
            raise ValueError("no palette today")
        return super().get(spec, weight, op_type, kmeans, precision)


def test_a_trial_error_is_raised_when_the_sweep_reaches_it():
    trials, weights = _trials("int8,pal2,pal4")
    sim = ChunkSimulator(trials, weights, _FailingCache(), "exact")
    try:
        sim.wait(0)
        with pytest.raises(ValueError, match="no palette"):
            sim.wait(1)
        sim.wait(2)
    finally:
        sim.close()
