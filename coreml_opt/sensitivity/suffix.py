"""Evaluate only the part of the network after a changed layer, from cached activations.

The model is traced once with ``torch.fx``. For each layer we cut the graph just before the first
node that reads its weight; everything before the cut is unchanged by compressing that layer, so the
values that cross the cut are computed once for the evaluation data and cached. A trial then runs
only the nodes after the cut: the traced graph's own nodes, on the values it produced. Cuts are used
only if the traced graph reproduces the model's own outputs bit for bit on the evaluation data, and
a cut is dropped when a value crossing it is changed in place later in the forward pass (tensor
version counters tell, whatever op did it): a trial would then start from the changed value, or
change it for the next trial. Dropped cuts, untraceable models and caches over their byte budget
run the full forward pass.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..evaluation.backends import first_tensor

logger = logging.getLogger(__name__)

DEFAULT_MAX_CACHE_BYTES = 1 << 30


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps the values of the requested nodes, with the version counters
    their tensors had when produced (an in-place op later bumps them, views included)."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[fx.Node, Any] = {}
        self.versions: dict[fx.Node, list[int]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
            self.versions[n] = [t._version for t in _tensors(result)]
        return result

    def changed(self) -> set[fx.Node]:
        """Recorded nodes whose tensors were changed in place after they were produced."""
        return {n for n, versions in self.versions.items()
                if [t._version for t in _tensors(self.values[n])] != versions}


class SuffixRunner:
    """Per-layer graph suffixes plus the activations that feed them, for one list of input batches."""

    def __init__(self, model: nn.Module, layer_paths: dict[str, Sequence[str]],
                 max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> None:
        """``layer_paths`` maps a layer to every parameter path that holds its weight (tied aliases)."""
        self.max_cache_bytes = max_cache_bytes
        self._suffix: dict[str, fx.GraphModule] = {}
        self._inputs: dict[str, list[fx.Node]] = {}
        self._cache: dict[str, list[tuple]] = {}
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as exc:  # data-dependent control flow etc.: full forward for every trial
            logger.info("model is not fx-traceable (%s: %s); evaluating full forward passes",
                        type(exc).__name__, str(exc).splitlines()[0][:120] if str(exc) else "")
            self.gm = None
            return
        nodes = list(self.gm.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        for layer, paths in layer_paths.items():
            cut = self._cut_index(nodes, paths)
            if cut is None:
                continue
            live = [n for n in nodes[:cut] if n.op != "get_attr" and any(index[u] >= cut for u in n.users)]
            self._inputs[layer] = live
            self._suffix[layer] = self._build_suffix(nodes, cut, live)

    @property
    def available(self) -> list[str]:
        """Layers whose trials run from cached activations."""
        return [layer for layer in self._suffix if layer in self._cache]

    @staticmethod
    def _cut_index(nodes: list[fx.Node], paths: Sequence[str]) -> int | None:
        for i, n in enumerate(nodes):
            if n.op in ("call_module", "get_attr") and any(
                    p == n.target or p.startswith(f"{n.target}.") for p in paths):
                return i
        return None

    def _build_suffix(self, nodes: list[fx.Node], cut: int, live: list[fx.Node]) -> fx.GraphModule:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, n in enumerate(live):
            env[n] = graph.placeholder(f"cut_{i}")
        for n in nodes[:cut]:  # attribute reads are free: re-read them after the cut
            if n.op == "get_attr":
                env[n] = graph.node_copy(n, lambda a: env[a])
        for n in nodes[cut:]:
            env[n] = graph.node_copy(n, lambda a: env[a])
        return fx.GraphModule(self.gm, graph)

    def prepare(self, batches: Sequence[torch.Tensor], baseline: Sequence[torch.Tensor]) -> None:
        """Record the activations crossing every cut, if the graph reproduces ``baseline`` exactly."""
        if self.gm is None or not self._suffix:
            return
        wanted = {n for live in self._inputs.values() for n in live}
        per_batch: list[dict[fx.Node, Any]] = []
        changed: set[fx.Node] = set()
        with torch.no_grad():
            for x, expected in zip(batches, baseline):
                recorder = _Recorder(self.gm, wanted)
                if not torch.equal(first_tensor(recorder.run(x)), expected):
                    logger.info("the traced graph does not reproduce the model's outputs exactly; "
                                "evaluating full forward passes")
                    return
                per_batch.append(recorder.values)
                changed |= recorder.changed()
        used = 0
        for layer, live in self._inputs.items():
            if changed.intersection(live):
                logger.info("a value crossing the cut before %s is changed in place later; using full forward",
                            layer)
                continue
            cached = [tuple(values[n] for n in live) for values in per_batch]
            size = sum(_nbytes(list(c)) for c in cached)
            if used + size > self.max_cache_bytes:
                logger.info("activation cache budget reached; %s runs full forward passes", layer)
                continue
            self._cache[layer] = cached
            used += size

    def outputs(self, layer: str) -> list[torch.Tensor] | None:
        """Per-batch outputs with the model's current weights, running only the suffix; None if unavailable."""
        cached = self._cache.get(layer)
        if cached is None:
            return None
        suffix = self._suffix[layer]
        with torch.no_grad():
            return [first_tensor(suffix(*values)) for values in cached]
