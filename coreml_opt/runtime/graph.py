"""Build a loaded ML Program once into a list of closures over resolved arguments, and run it in PyTorch.

Constants and constexpr (compressed-weight) chains, and any op whose inputs are all constant, are evaluated
once at build time; each remaining op becomes one closure that reads its inputs from the environment, calls
its handler and stores its outputs. Nothing is parsed per call.

Precision: ``fp32`` runs every op in fp32 (fp16 weights are widened exactly; an input port declared FLOAT16
is rounded to fp16 first, as Core ML converts it). ``fp16`` emulates a package
run with FLOAT16 compute precision: inputs, weights and every op's float output are rounded to fp16
(overflow becomes inf, as on the GPU/ANE). Not emulated: accumulation order and width inside an op
(matmul/conv reductions accumulate in fp32 here), fused kernels, and the ANE's own approximations of
transcendental functions — expect differences of a few fp16 ulps against a device.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import CoreMLOptError, ModelError, RuntimeOpError
from .loader import Graph, Node
from .ops import HANDLERS, VARIADIC, Context, supported_ops

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
_SMALL = 64  # integer/bool constants up to this many elements reach handlers as Python lists
_MINOR = "\0batch-inner"  # env key: variables holding the batch as the inner factor of a merged dim
_DATA_PARAMS = {"x", "y", "a", "b", "cond", "data"}  # operands that stay tensors even when small integer constants
# ops whose outputs are inputs' values moved or selected: fp16 inputs give fp16 outputs, no rounding needed
_VALUE_PRESERVING = {"reshape", "transpose", "expand_dims", "squeeze", "concat", "split", "slice_by_index",
                     "slice_by_size", "gather", "gather_along_axis", "tile", "flatten2d", "crop", "relu", "relu6",
                     "clip", "max_pool", "identity", "stack", "select", "reduce_max", "reduce_min", "maximum",
                     "minimum", "abs", "pad", "upsample_nearest_neighbor", "threshold", "thresholded_relu"}


def _is_folded(node: Node) -> bool:
    return node.type == "const" or node.type.startswith("constexpr_")


def check_supported(graph: Graph) -> None:
    """Raise ModelError naming the first op type the runtime lacks, its output, and the supported list."""
    for node in graph.nodes:
        if node.type not in HANDLERS:
            output = node.outputs[0].name if node.outputs else node.name
            raise ModelError(str(graph.path), f"op type {node.type!r} (output {output!r}) is not supported by the "
                             f"package runtime (supported: {', '.join(supported_ops())})",
                             "run this model on macOS with Core ML, or add a handler in coreml_opt/runtime/ops/")


class Executable:
    """The built form of one package's main function on one device at one precision."""

    def __init__(self, graph: Graph, device: str | torch.device = "cpu", precision: str = "fp32",
                 overrides: Mapping[str, Any] | None = None, variables: Sequence[str] | None = None) -> None:
        """``overrides`` maps a constant's output variable (e.g. a weight, or the output of its constexpr
        chain) to a value used instead of the stored one, fixed at build time. ``variables`` names constants
        kept replaceable after the build: each run reads them like inputs, from their stored value or the
        one ``set_values`` gave, so a sensitivity sweep on a package builds once and swaps one weight per trial."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_supported(graph)
        self.graph = graph
        self.precision = precision
        self.device = resolve_device(device)  # one line when absent (cuda on a CPU-only torch), before any op
        self.ctx = Context(self.device, precision == "fp16", {k: p.shape for k, p in graph.ports.items()})
        self.consts: dict[str, Any] = {}
        self.overrides = dict(overrides or {})
        self.variables = set(variables or ())
        self.values: dict[str, torch.Tensor] = {}  # current value of each variable (fp32 for floats)
        unknown = sorted((set(self.overrides) | self.variables) - set(graph.ports))
        if unknown:
            raise KeyError(f"overrides name no variable of the package: {unknown[:5]}")
        self.steps: list[Callable[[dict], None]] = []
        self.step_reads: list[set[str]] = []  # the variables each step reads, for prefix caching
        self.batching: str | None = None  # "batched", "vmap" or "looped"; decided on the first batch
        with torch.no_grad():
            for node in graph.nodes:
                self._add(node)

    # -- building ---------------------------------------------------------------------------------
    def _raw(self, value: Any) -> Any:
        """A stored value in its stored dtype (for constexpr decompression)."""
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "US":
                return value.tolist()
            if value.ndim == 0 and value.dtype.kind in "iub":
                return value.item()
            return torch.from_numpy(value.copy()).to(self.device)  # ascontiguousarray would make 0-d 1-d
        return value

    def _arg(self, value: Any, param: str = "") -> Any:
        """A constant as a handler argument: small int/bool -> Python (not for data operands such as ``x``),
        float scalar -> float, float -> compute dtype."""
        if isinstance(value, (str, int, float, bool, list, tuple)) or value is None:
            return value
        if isinstance(value, np.ndarray):
            value = self._raw(value)
            if not isinstance(value, torch.Tensor):
                return value
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            value = self._round(value.to(torch.float32))
            return value.item() if value.dim() == 0 else value
        if value.dim() <= 1 and value.numel() <= _SMALL and param not in _DATA_PARAMS:
            return value.item() if value.dim() == 0 else value.tolist()
        return value

    def _round(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(torch.float16).to(torch.float32) if self.ctx.fp16 else value

    def _add(self, node: Node) -> None:
        if node.outputs and all(port.name in self.overrides for port in node.outputs):
            for port in node.outputs:
                self.consts[port.name] = torch.as_tensor(self.overrides[port.name]).to(self.device)
            return
        handler = HANDLERS[node.type]
        folded = _is_folded(node)
        static: dict[str, Any] = {k: (self._raw(v) if folded else self._arg(v, k)) for k, v in node.attrs.items()}
        dynamic: list[tuple[str, Any]] = []
        for param, args in node.inputs.items():
            items = []
            is_const = True
            for arg in args:
                if arg.var is None:
                    items.append(("c", self._raw(arg.value) if folded else self._arg(arg.value, param)))
                elif arg.var in self.consts and arg.var not in self.variables:
                    value = self.consts[arg.var]
                    items.append(("c", value if folded else self._arg(value, param)))
                else:
                    items.append(("v", arg.var))
                    is_const = False
            variadic = param in VARIADIC
            if is_const:
                static[param] = [v for _, v in items] if variadic else items[0][1]
            else:
                dynamic.append((param, items if variadic else items[0]))
        outputs = [port.name for port in node.outputs]
        if not dynamic:  # all-constant: evaluate now
            result = handler(static, node, self.ctx)
            for name, value in zip(outputs, result if isinstance(result, tuple) else (result,)):
                if name in self.variables:
                    self.values[name] = self._finish(torch.as_tensor(value).to(self.device))
                else:
                    self.consts[name] = value if folded else self._finish(value)
            return
        self.steps.append(self._step(handler, node, static, dynamic, outputs))
        self.step_reads.append({v for _, item in dynamic for kind, v in (item if isinstance(item, list) else [item])
                                if kind == "v"})

    def _finish(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return self._round(value.to(torch.float32))
        return value

    def _step(self, handler, node, static, dynamic, outputs) -> Callable[[dict], None]:
        ctx, path = self.ctx, self.graph.path
        # fp32 mode: handlers of fp32 inputs return fp32, nothing to do per op
        exact = not ctx.fp16 or node.type in _VALUE_PRESERVING
        finish = (lambda value: value) if exact else self._finish
        single = len(outputs) == 1
        out0 = outputs[0]

        inputs = [v for _, item in dynamic for kind, v in (item if isinstance(item, list) else [item]) if kind == "v"]
        is_reshape = node.type == "reshape"

        def step(env: dict) -> None:
            args = dict(static)
            for param, item in dynamic:
                if isinstance(item, list):
                    args[param] = [env[v] if kind == "v" else v for kind, v in item]
                else:
                    args[param] = env[item[1]]
            minor = env.get(_MINOR)
            minor_in = bool(minor) and any(v in minor for v in inputs)
            if is_reshape:
                ctx.minor_in = minor_in
            try:
                result = handler(args, node, ctx)
            except NotImplementedError as exc:
                raise ModelError(str(path), f"op {node.type!r} (output {out0!r}) uses {exc}, which the package "
                                 "runtime does not support", "run this model on macOS with Core ML") from None
            except CoreMLOptError:
                raise
            except Exception as exc:  # a handler fault: name the op and package, not a traceback
                detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                fix = ("check that the input values are valid indices here (e.g. token ids below the embedding "
                       "vocabulary)" if isinstance(exc, IndexError)
                       else "report it with the package; run this model on macOS with Core ML meanwhile")
                raise RuntimeOpError(str(path), f"op {node.type!r} (output {out0!r}) failed in the package runtime "
                                     f"({type(exc).__name__}: {detail})", fix) from exc
            if single:
                env[out0] = finish(result[0] if isinstance(result, tuple) else result)
            else:
                for name, value in zip(outputs, result):
                    env[name] = finish(value)
            if (ctx.minor_out if is_reshape else minor_in):  # the batch stays an inner factor downstream
                env.setdefault(_MINOR, set()).update(outputs)
        return step

    # -- running ----------------------------------------------------------------------------------
    def set_values(self, values: Mapping[str, Any]) -> None:
        """Replace the current values of variables named at build time (float values are used in fp32,
        rounded to fp16 in fp16 mode); KeyError for a name that is not a variable."""
        unknown = sorted(set(values) - self.variables)
        if unknown:
            raise KeyError(f"not variables of this build: {unknown[:5]}")
        for name, value in values.items():
            self.values[name] = self._finish(torch.as_tensor(value).to(self.device))

    def _input(self, port, value: Any) -> torch.Tensor:
        tensor = torch.as_tensor(value, device=self.device)
        if port.dtype == "FLOAT16":  # the package takes fp16: round as Core ML does, in either mode
            return tensor.to(torch.float16).to(torch.float32)
        if port.dtype.startswith("FLOAT"):
            return self._round(tensor.to(torch.float32))
        return tensor.to({"INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}.get(port.dtype, torch.int32))

    def _run(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = {**self.values, **tensors}
        with torch.no_grad():
            for step in self.steps:
                step(env)
        return {name: env[name] if name in env else self.consts[name] for name in self.graph.outputs}

    def first_reader(self, variable: str) -> int:
        """Index of the first step that reads ``variable`` (a build-time variable); steps before it do not
        depend on its value."""
        return next((i for i, reads in enumerate(self.step_reads) if variable in reads), len(self.steps))

    def run_prefix(self, inputs: Mapping[str, Any], stop: int) -> dict[str, Any] | None:
        """The values that steps from ``stop`` on (and the outputs) read, after running ``steps[:stop]`` on a
        batch; None when the batch does not run as one batch (vmap or per-sample loop: then use ``__call__``,
        since a suffix of those would not equal the full run bit for bit)."""
        tensors = self._tensors(inputs)
        if self._batching(tensors) != "batched":
            return None
        env: dict[str, Any] = {**self.values, **tensors}
        with torch.no_grad():
            for step in self.steps[:stop]:
                step(env)
        live = set(self.graph.outputs).union(*self.step_reads[stop:]) - self.variables
        cached = {name: value for name, value in env.items() if name in live}
        if _MINOR in env:  # which values hold the batch as an inner factor: the suffix's reshapes need it
            cached[_MINOR] = frozenset(env[_MINOR])
        return cached

    def run_suffix(self, cached: Mapping[str, Any], start: int) -> dict[str, torch.Tensor]:
        """Outputs from ``run_prefix(inputs, start)``'s values: only ``steps[start:]`` run, with the current
        variable values."""
        env: dict[str, Any] = {**cached, **self.values}
        if _MINOR in env:
            env[_MINOR] = set(env[_MINOR])  # steps add to it; the cache is reused by every trial
        with torch.no_grad():
            for step in self.steps[start:]:
                step(env)
        return {name: env[name] if name in env else self.consts[name] for name in self.graph.outputs}

    def _looped(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = [self._run({k: v[i:i + 1] for k, v in tensors.items()}) for i in range(self._batch(tensors))]
        return {name: torch.cat([p[name] for p in parts]) for name in self.graph.outputs}

    def _vmapped(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch-1 graph mapped over the batch by ``torch.func.vmap``: every op sees the declared shapes."""
        def one(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = self._run({k: v.unsqueeze(0) for k, v in sample.items()})
            return {k: v.squeeze(0) for k, v in out.items()}
        return torch.func.vmap(one)(tensors)

    def _batch(self, tensors: dict[str, torch.Tensor]) -> int:
        return next(iter(tensors.values())).shape[0] if tensors else 1

    def _agrees(self, run: Callable, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether ``run`` on two samples equals two single runs (to fp16/fp32 rounding of the mode)."""
        pair = {k: v[:2] for k, v in tensors.items()}
        try:
            batched = run(pair)
        except (RuntimeError, IndexError, ValueError, TypeError, NotImplementedError, CoreMLOptError):
            return False
        looped = self._looped(pair)
        rtol = 5e-3 if self.ctx.fp16 else 1e-4
        for name in self.graph.outputs:
            a, b = batched[name], looped[name]
            if a.shape != b.shape:
                return False
            if a.is_floating_point():
                scale = float(b.abs().max()) if b.numel() else 0.0
                if not torch.allclose(a, b, rtol=rtol, atol=rtol * 0.1 * max(scale, 1.0), equal_nan=True):
                    return False
            elif not torch.equal(a, b):
                return False
        return True

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run on ``inputs`` by the package's input names; outputs by its output names (float outputs fp32).

        A batch N (leading dim) runs as one batch when the graph allows it; the first call with N > 1 checks
        that two samples batched equal two single runs. If not (literal batch-1 reshapes that the handlers
        cannot carry, e.g. attention's seq-first layout), the batch-1 graph is mapped over the batch with
        ``torch.func.vmap`` (checked the same way), and failing that, later calls loop over samples."""
        tensors = self._tensors(inputs)
        mode = self._batching(tensors)
        if mode == "vmap":
            return self._vmapped(tensors)
        if mode == "looped":
            return self._looped(tensors)
        return self._run(tensors)

    def _tensors(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The input tensors by port name, in the dtypes the ports declare; KeyError naming a missing one."""
        tensors: dict[str, torch.Tensor] = {}
        for port in self.graph.inputs:
            if port.name not in inputs:
                raise KeyError(f"missing input {port.name!r}; the package's inputs are "
                               f"{[p.name for p in self.graph.inputs]}")
            tensors[port.name] = self._input(port, inputs[port.name])
        return tensors

    def _batching(self, tensors: dict[str, torch.Tensor]) -> str:
        """How this batch runs: "batched" (one run), "vmap" or "looped"; decided on the first batch N > 1
        of a batch-1 graph and kept, so full and prefix/suffix runs batch the same way."""
        declared = self.graph.inputs[0].shape[:1] if self.graph.inputs else ()
        if self._batch(tensors) <= 1 or declared != (1,):
            return "batched"
        if self.batching is None:
            self.batching = next((mode for mode, fn in (("batched", self._run), ("vmap", self._vmapped))
                                  if self._agrees(fn, tensors)), "looped")
            logger.info("%s: a batch runs %s", self.graph.path, self.batching)
        return self.batching
