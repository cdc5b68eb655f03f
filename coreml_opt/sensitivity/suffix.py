"""Evaluate only the part of the network after a changed layer, from cached activations.

The model is traced once with ``torch.fx``. For each layer we cut the graph just before the first
node that reads its weight; everything before the cut is unchanged by compressing that layer, so the
values that cross the cut are computed once for the evaluation data and cached. A trial then runs
only the nodes after the cut: the traced graph's own nodes, on the values it produced. Cuts are used
only if the traced graph reproduces the model's own outputs bit for bit on the evaluation data, and
a cut is dropped when a value crossing it is changed in place later in the forward pass (tensor
version counters tell, whatever op did it): a trial would then start from the changed value, or
change it for the next trial.

The cache is bounded: cuts fill ``max_cache_bytes`` of memory in model order (storage bytes, each
storage once); the rest spill to disk (``torch.save`` per cut and batch in a temporary folder removed
by :meth:`SuffixRunner.close`, memory-mapped back one batch at a time), up to ``spill_bytes``. A layer
whose cut is not held (no room, or changed in place) runs the suffix of the nearest earlier held cut:
that suffix still contains every node from its own cut on, including this layer's first reader, so the
result is the same bit for bit, from less than the input. Untraceable models run the full forward pass.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import fx, nn

from ..evaluation.backends import first_tensor
from .memory import tensor_bytes

logger = logging.getLogger(__name__)

DEFAULT_MAX_CACHE_BYTES = 1 << 30
SPILL_DISK_MARGIN = 2 << 30  # free disk the spill folder leaves untouched when spill_bytes is not given

Entry = Union[tuple, Path]  # one batch's values crossing a cut: in memory, or the file they spilled to


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


class _Streamer(fx.Interpreter):
    """Runs the traced graph and hands each cut's values to ``place`` when the run reaches the cut, keeping
    nothing itself: one batch never holds every cut's values at once."""

    def __init__(self, gm: fx.GraphModule, at: dict[fx.Node, list[str]], inputs: dict[str, list[fx.Node]],
                 place: Any) -> None:
        super().__init__(gm)
        self.at, self.inputs, self.place = at, inputs, place

    def run_node(self, n: fx.Node) -> Any:
        for layer in self.at.get(n, ()):
            self.place(layer, tuple(self.env[v] for v in self.inputs[layer]))
        return super().run_node(n)


class SuffixRunner:
    """Per-layer graph suffixes plus the activations that feed them, for one list of input batches."""

    def __init__(self, model: nn.Module, layer_paths: dict[str, Sequence[str]],
                 max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES, spill_bytes: Optional[int] = None,
                 spill_dir: Optional[str] = None) -> None:
        """``layer_paths`` maps a layer to every parameter path that holds its weight (tied aliases);
        ``max_cache_bytes`` of cut values stay in memory, up to ``spill_bytes`` more go to disk under
        ``spill_dir`` (default: the system temp folder; None: its free space less 2 GiB; 0: no spill)."""
        self.max_cache_bytes, self.spill_bytes, self.spill_dir = max_cache_bytes, spill_bytes, spill_dir
        self._suffix: dict[str, fx.GraphModule] = {}
        self._inputs: dict[str, list[fx.Node]] = {}
        self._cut: dict[str, int] = {}
        self._held: dict[str, list[Entry]] = {}
        self._nearest: dict[str, str] = {}
        self._folder: Optional[Path] = None
        self._cleanup: Optional[weakref.finalize] = None
        self.memory_bytes = 0  # cut values held in memory (storage bytes)
        self.disk_bytes = 0  # cut values spilled to disk (file bytes)
        self.counts: Counter = Counter()  # evaluations by where they started: memory, disk, nearest, full
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
            self._cut[layer] = cut
            self._suffix[layer] = self._build_suffix(nodes, cut, live)

    @property
    def available(self) -> list[str]:
        """Layers whose trials run a suffix: from their own cached cut or the nearest earlier one."""
        return [layer for layer in self._suffix if layer in self._held or layer in self._nearest]

    def placement(self) -> dict[str, str]:
        """Where each layer's trials start: ``memory``, ``disk``, ``nearest:<layer>`` or ``full``."""
        out = {}
        for layer in self._suffix:
            if layer in self._held:
                out[layer] = "disk" if any(isinstance(e, Path) for e in self._held[layer]) else "memory"
            else:
                out[layer] = f"nearest:{self._nearest[layer]}" if layer in self._nearest else "full"
        return out

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

    def prepare(self, batches: Sequence[torch.Tensor], baseline: Sequence[torch.Tensor],
                progress: Optional[Callable[[int], Any]] = None) -> None:
        """Record the activations crossing every cut, if the graph reproduces ``baseline`` exactly;
        ``progress(1)`` after each batch (a progress bar's ``update``).

        A one-sample run first finds cuts changed in place and each cut's bytes per sample (to plan which
        cuts fit in memory); then each batch runs once, its cut values kept or spilled as the run passes them."""
        if self.gm is None or not self._suffix or not batches:
            return
        nodes = list(self.gm.graph.nodes)
        wanted = {n for live in self._inputs.values() for n in live}
        probe = _Recorder(self.gm, wanted)
        try:
            with torch.no_grad():
                probe.run(batches[0][:1])
        except Exception as exc:  # the traced graph fails where the model ran: full forward for every trial
            logger.info("the traced graph fails on one sample (%s); evaluating full forward passes",
                        type(exc).__name__)
            return
        changed = probe.changed()
        layers = sorted((layer for layer in self._inputs if not changed.intersection(self._inputs[layer])),
                        key=lambda layer: self._cut[layer])
        for layer in self._inputs:
            if layer not in layers:
                logger.info("a value crossing the cut before %s is changed in place later; it runs from an "
                            "earlier cut", layer)
        rows = sum(int(x.shape[0]) for x in batches)
        seen: set[int] = set()
        plan: dict[str, str] = {}
        memory = 0
        for layer in layers:  # model order: the earliest cuts stay in memory
            size = tensor_bytes([probe.values[n] for n in self._inputs[layer]], seen) * rows
            if memory + size <= self.max_cache_bytes:
                plan[layer], memory = "memory", memory + size
            else:
                plan[layer] = "disk"
        del probe
        self._capacity = self._spill_capacity()
        self._plan, self._seen = plan, set()
        at: dict[fx.Node, list[str]] = {}
        for layer in layers:
            at.setdefault(nodes[self._cut[layer]], []).append(layer)
        self._held = {layer: [] for layer in layers}
        with torch.no_grad():
            for b, (x, expected) in enumerate(zip(batches, baseline)):
                self._batch = b
                out = _Streamer(self.gm, at, self._inputs, self._place).run(x)
                if not torch.equal(first_tensor(out), expected):
                    logger.info("the traced graph does not reproduce the model's outputs exactly; "
                                "evaluating full forward passes")
                    self._held = {}
                    self.close()
                    return
                if progress is not None:
                    progress(1)
        self._held = {layer: held for layer, held in self._held.items() if len(held) == len(batches)}
        for layer in self._suffix:
            if layer not in self._held:
                source = max((held for held in self._held if self._cut[held] <= self._cut[layer]),
                             key=lambda held: self._cut[held], default=None)
                if source is not None:
                    self._nearest[layer] = source
        where = Counter(p.partition(":")[0] for p in self.placement().values())
        logger.info("cut activations: %d layers in memory (%.1f MiB), %d on disk (%.1f MiB), %d from the nearest "
                    "earlier cut, %d full forward", where["memory"], self.memory_bytes / 2**20, where["disk"],
                    self.disk_bytes / 2**20, where["nearest"], where["full"])

    def _spill_capacity(self) -> int:
        if self.spill_bytes is not None:
            return self.spill_bytes
        free = shutil.disk_usage(self.spill_dir or tempfile.gettempdir()).free
        return max(0, free - SPILL_DISK_MARGIN)

    def _place(self, layer: str, values: tuple) -> None:
        """Keep one batch's values at ``layer``'s cut in memory, or spill them, or give the layer up."""
        held = self._held.get(layer)
        if held is None or len(held) != self._batch:  # given up on an earlier batch
            return
        if self._plan[layer] == "memory":
            seen = set(self._seen)
            size = tensor_bytes(values, seen)
            if self.memory_bytes + size <= self.max_cache_bytes:
                held.append(values)
                self.memory_bytes += size
                self._seen = seen
                return
        path = self._spill_path(layer)
        torch.save(values, path)
        size = path.stat().st_size
        if self.disk_bytes + size > self._capacity:
            path.unlink()
            self._drop(layer)
            return
        held.append(path)
        self.disk_bytes += size

    def _drop(self, layer: str) -> None:
        for entry in self._held.pop(layer, []):
            if isinstance(entry, Path):
                self.disk_bytes -= entry.stat().st_size
                entry.unlink()
            # memory entries are not subtracted: their storages may be shared with kept cuts

    def _spill_path(self, layer: str) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="coreml-opt-cuts-", dir=self.spill_dir))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        return self._folder / f"{list(self._cut).index(layer)}-{self._batch}.pt"

    def outputs(self, layer: str) -> list[torch.Tensor] | None:
        """Per-batch outputs with the model's current weights, running only a suffix; None if unavailable."""
        source = layer if layer in self._held else self._nearest.get(layer)
        if source is None:
            self.counts["full"] += 1
            return None
        held = self._held[source]
        self.counts["nearest" if source != layer else
                    "disk" if any(isinstance(e, Path) for e in held) else "memory"] += 1
        suffix = self._suffix[source]
        out = []
        with torch.no_grad():
            for entry in held:
                values = torch.load(entry, mmap=True, weights_only=True) if isinstance(entry, Path) else entry
                out.append(first_tensor(suffix(*values)))
                del values  # unmaps a spilled batch before the next one is read
        return out

    def close(self) -> None:
        """Remove the spill folder (also done when the runner is garbage-collected or the process exits)."""
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup, self._folder = None, None
