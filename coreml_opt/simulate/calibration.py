"""Input statistics of every conv/linear weight over unlabeled calibration data, for error compensation.

For each weight W of shape (O, I/G, *k) read by ``F.conv1d``/``F.conv2d`` (G groups) or ``F.linear``
((O, I), G = 1) we keep the mean of the layer's im2col patch and of its square, per group:
``patch_mean``/``patch_sq`` of shape (G, I/G, *k). The patch is taken as the op sees it, after the
op's own zero padding (and any padding module before it), so border positions, stride and
dilation are exact: the expected output shift of channel o is ``(W_q - W)[o] . patch_mean[g(o)]``.
Calls are caught with a ``TorchFunctionMode``, so functional convs and padding subclasses
(EfficientNet's static same padding) need no special cases. Statistics are keyed by the content
hash of the weight's fp16 values, so the package's weights find them without a name mapping.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerStats:
    """Mean im2col patch and mean squared patch of one weight's input, (G, I/G, *kernel), float64."""

    patch_mean: torch.Tensor
    patch_sq: torch.Tensor
    samples: int  # calibration inputs seen
    # E[patch patch^T] per group, (G, D, D) with D = I/G * prod(kernel) in the weight's C order; only when
    # collected with ``second_moments`` (the input Hessian of GPTQ, ``+gptq``), else None
    patch_gram: torch.Tensor | None = None
    gram_vectors: int = 0  # input vectors summed into patch_gram: linear rows, or conv im2col positions

    @property
    def groups(self) -> int:
        return int(self.patch_mean.shape[0])


@dataclass
class Statistics:
    """LayerStats by weight content hash (see :func:`weight_key`), plus a token that identifies the set."""

    layers: dict[str, LayerStats] = field(default_factory=dict)

    @functools.cached_property
    def token(self) -> str:
        """A digest of every statistic (computed once; do not add layers after reading it): cached
        simulations of compensated specs are keyed by it."""
        digest = hashlib.blake2b(digest_size=12)
        for key in sorted(self.layers):
            stats = self.layers[key]
            digest.update(key.encode())
            digest.update(stats.patch_mean.numpy().tobytes())
            digest.update(stats.patch_sq.numpy().tobytes())
            if stats.patch_gram is not None:
                digest.update(stats.patch_gram.numpy().tobytes())
                digest.update(str(stats.gram_vectors).encode())
        return digest.hexdigest()

    def get(self, weight: torch.Tensor) -> LayerStats | None:
        return self.layers.get(weight_key(weight))


def weight_key(weight: torch.Tensor) -> str:
    """Content hash of a weight's fp16 values and shape: the same for the torch weight and the package's."""
    from .cache import content_hash

    return content_hash(weight, "fp16")


# Process-wide, not a context variable: sweeps simulate in worker threads, which must see them too.
_ACTIVE: list[Statistics | None] = [None]
_LOCK = threading.Lock()


@contextlib.contextmanager
def using_statistics(stats: Statistics | None) -> Iterator[Statistics | None]:
    """Within the block, compensated specs read their calibration statistics from ``stats`` (in every thread);
    blocks nest, the innermost wins."""
    with _LOCK:
        previous, _ACTIVE[0] = _ACTIVE[0], stats
    try:
        yield stats
    finally:
        with _LOCK:
            _ACTIVE[0] = previous


_LOCAL = threading.local()


@contextlib.contextmanager
def thread_statistics(stats: Statistics | None) -> Iterator[None]:
    """Within the block, in this thread only, ``stats`` win over :func:`using_statistics` (a cache that owns
    its statistics simulates under it, whichever thread runs the simulation)."""
    previous = getattr(_LOCAL, "stats", None)
    _LOCAL.stats = stats
    try:
        yield
    finally:
        _LOCAL.stats = previous


def active_statistics() -> Statistics | None:
    """This thread's statistics (:func:`thread_statistics`), else those of :func:`using_statistics`, or None."""
    local = getattr(_LOCAL, "stats", None)
    return local if local is not None else _ACTIVE[0]


def needs_statistics(specs: Iterable) -> bool:
    """Whether any of ``specs`` compensates from calibration statistics (``+aw``, ``+bc``, ``+gptq``)."""
    from ..spec import CompensatedSpec, parse_spec

    return any(isinstance(parse_spec(s), CompensatedSpec) for s in specs)


def needs_second_moments(specs: Iterable) -> bool:
    """Whether any of ``specs`` needs each layer's full input second moment E[x x^T] (``+gptq``)."""
    from ..spec import CompensatedSpec, parse_spec

    return any(isinstance(p, CompensatedSpec) and p.error_feedback for p in map(parse_spec, specs))


def statistics_if_needed(specs: Iterable, model: torch.nn.Module, batches: list | None,
                         label: str = "model") -> Statistics | None:
    """:func:`collect_statistics` of ``model`` over ``batches`` when a spec needs them (with second moments when
    one is ``+gptq``), else None; DataError (one line) when they are needed and there is no data."""
    specs = list(specs)
    if not needs_statistics(specs):
        return None
    if not batches:
        from ..errors import DataError

        raise DataError(label, "has no calibration data for the compensated candidates (+aw, +bc, +gptq)",
                        "pass --data with the sweep's inputs, or drop +aw/+bc/+gptq candidates")
    stats = collect_statistics(model, batches, second_moments=needs_second_moments(specs))
    few = underdetermined(stats, model)
    if few:
        many = len(few) > 1
        message = (f"+gptq: {len(few)} weight{'s' if many else ''} {'have' if many else 'has'} fewer calibration "
                   f"input vectors than input columns ({'; '.join(few)}), so {'their' if many else 'its'} figures on "
                   "this data are optimistic for other inputs (EfficientNet-Lite0's classifier at pal2/g8 on 128 "
                   "photos: KL 0 on them, 0.011 on others); more calibration data narrows the gap")
        if message not in _WARNED:  # a workflow's sweep and plan collect the same statistics: say it once
            _WARNED.add(message)
            logger.warning("%s", message)
    return stats


_WARNED: set[str] = set()


def underdetermined(stats: Statistics, model: torch.nn.Module) -> list[str]:
    """``"NAME: N vectors for D columns"`` for each weight whose input second moment (GPTQ's Hessian) has fewer
    calibration vectors than columns, e.g. a classifier after global pooling: GPTQ then rounds into directions
    the data never visit, and the sweep and plan, measured on that data, cannot see the cost."""
    short = {key: layer for key, layer in stats.layers.items()
             if layer.patch_gram is not None and layer.gram_vectors < layer.patch_gram.shape[-1]}
    if not short:  # the usual case: no weight of the model is hashed for its name
        return []
    names: dict[str, str] = {}
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            names.setdefault(weight_key(param.detach()), name)
    return [f"{names.get(key, key)}: {layer.gram_vectors} vectors for {layer.patch_gram.shape[-1]} columns"
            for key, layer in short.items()]


class _Accumulator:
    """Running sums of the (batch-summed) input map and its square for one weight."""

    def __init__(self, op: str, geometry: dict, second_moments: bool = False) -> None:
        self.op, self.geometry, self.second_moments = op, geometry, second_moments
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.positions = 0  # im2col patches summed into ``gram``
        self.count = 0

    def add(self, x: torch.Tensor, weight_shape: tuple[int, ...]) -> None:
        x = x.detach().to(torch.float64)
        if self.op == "linear":
            flat = x.reshape(-1, x.shape[-1])
            s, sq, n = flat.sum(0), (flat * flat).sum(0), flat.shape[0]
        else:
            s, sq, n = x.sum(0), (x * x).sum(0), x.shape[0]
        if self.second_moments:
            self._add_gram(x, weight_shape)
        if self.total is not None and self.total.shape != s.shape:
            from ..errors import DataError

            raise DataError("calibration data", f"reaches a layer in different shapes ({tuple(self.total.shape)} "
                            f"then {tuple(s.shape)}), so its mean input patch is undefined",
                            "give inputs of one size (resize or crop them)")
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += n

    def _add_gram(self, x: torch.Tensor, weight_shape: tuple[int, ...]) -> None:
        """Sum patch patch^T per group over every im2col position (chunked: an unfolded depthwise input at
        112x112 would be gigabytes at once)."""
        if self.op == "linear":
            flat = x.reshape(-1, x.shape[-1])
            gram, positions = (flat.T @ flat)[None], flat.shape[0]
        else:
            groups, per = self.geometry["groups"], math.prod(weight_shape[1:])
            gram, positions = torch.zeros(groups, per, per, dtype=torch.float64), 0
            step = max(1, (1 << 24) // max(1, x[0].numel() * math.prod(weight_shape[2:])))
            for i in range(0, x.shape[0], step):
                cols = self._unfold(x[i:i + step], weight_shape)  # (N, C*prod(k), L)
                n, length = cols.shape[0], cols.shape[-1]
                cols = cols.reshape(n, groups, per, length).permute(1, 2, 0, 3).reshape(groups, per, n * length)
                gram += torch.bmm(cols, cols.transpose(1, 2))  # (G, D, D): one batched GEMM
                positions += n * length
        self.gram = gram if self.gram is None else self.gram + gram
        self.positions += positions

    def _unfold(self, x: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
        """im2col of a conv input (N, C, *spatial) as the op sees it: (N, C*prod(kernel), positions)."""
        g = self.geometry
        kernel = tuple(weight_shape[2:])
        if len(kernel) == 1:  # conv1d as a conv2d of height 1
            x = x[:, :, None, :]
            kernel, stride, padding, dilation = (1, *kernel), (1, *g["stride"]), (0, *g["padding"]), (1, *g["dilation"])
        else:
            stride, padding, dilation = g["stride"], g["padding"], g["dilation"]
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)

    def finish(self, weight_shape: tuple[int, ...]) -> LayerStats:
        mean, sq = self.total / self.count, self.total_sq / self.count
        gram = None if self.gram is None else (self.gram / self.positions).contiguous()
        if self.op == "linear":
            return LayerStats(mean[None].contiguous(), sq[None].contiguous(), self.count, gram, self.positions)
        cols = self._unfold(torch.stack([mean, sq]), weight_shape).mean(-1)  # (2, C*prod(k))
        shape = (self.geometry["groups"], weight_shape[1], *weight_shape[2:])
        return LayerStats(cols[0].reshape(shape).contiguous(), cols[1].reshape(shape).contiguous(), self.count, gram,
                          self.positions)


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _conv_padding(padding, weight: torch.Tensor, dilation: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    n = weight.dim() - 2
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        if any(t % 2 for t in total) or any(s != 1 for s in stride):
            raise ValueError("padding='same' with an even kernel extent is not symmetric; pad explicitly instead")
        return tuple(t // 2 for t in total)
    return _tuple(padding, n)


class _Recorder(TorchFunctionMode):
    """Catches F.conv1d/F.conv2d/F.linear calls and accumulates their inputs per weight tensor."""

    def __init__(self, second_moments: bool = False) -> None:
        super().__init__()
        self.second_moments = second_moments
        self.found: dict[int, tuple[torch.Tensor, _Accumulator]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv1d, F.conv2d, torch.conv1d, torch.conv2d):
            self._conv(*args, **kwargs)
        elif func in (F.linear, torch._C._nn.linear):
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self._entry(weight, "linear", {}).add(x, tuple(weight.shape))
        return func(*args, **kwargs)

    def _conv(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> None:
        n = weight.dim() - 2
        stride, dilation = _tuple(stride, n), _tuple(dilation, n)
        geometry = dict(stride=stride, dilation=dilation, groups=groups,
                        padding=_conv_padding(padding, weight, dilation, stride))
        self._entry(weight, "conv", geometry).add(x, tuple(weight.shape))

    def _entry(self, weight: torch.Tensor, op: str, geometry: dict) -> _Accumulator:
        found = self.found.get(id(weight))
        if found is None or found[0] is not weight:
            found = (weight, _Accumulator(op, geometry, self.second_moments))
            self.found[id(weight)] = found
        elif found[1].geometry != geometry:
            raise ValueError(f"a weight of shape {tuple(weight.shape)} is used by convs of different geometry; "
                             "its input statistics are ambiguous")
        return found[1]


@torch.no_grad()
def collect_statistics(model: torch.nn.Module, batches: Iterable, second_moments: bool = False) -> Statistics:
    """Run ``model`` on ``batches`` (tensors, or tuples of forward arguments) and keep every conv/linear
    weight's input statistics (float64 sums, so the batch split does not change them beyond rounding);
    ``second_moments`` adds each one's E[patch patch^T] (``+gptq``)."""
    recorder = _Recorder(second_moments)
    was_training = model.training
    model.eval()
    try:
        with recorder:
            for batch in batches:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        model.train(was_training)
    out = Statistics()
    for weight, acc in recorder.found.values():
        if acc.count:
            out.layers[weight_key(weight)] = acc.finish(tuple(weight.shape))
    logger.info("calibration statistics of %d weights", len(out.layers))
    return out


def package_statistics(path: str | os.PathLike, batches: Iterable[torch.Tensor],
                       second_moments: bool = False) -> Statistics:
    """:func:`collect_statistics` of an ``.mlpackage`` run by the package runtime (fp32): its conv/linear ops
    call F.conv*/F.linear with the stored weights and Core ML's own padding, so no torch model is needed."""
    from ..evaluation.backends import PackageBackend

    backend = PackageBackend(path)
    batches = list(batches)
    with torch.no_grad():
        backend(batches[0][:2])  # the runtime's one-time batching check runs outside the recording
        recorder = _Recorder(second_moments)
        with recorder:
            for batch in batches:
                backend(batch)
    out = Statistics()
    for weight, acc in recorder.found.values():
        if acc.count:
            out.layers[weight_key(weight)] = acc.finish(tuple(weight.shape))
    return out


class CorrectedBiases(TorchFunctionMode):
    """Within the block, every F.conv1d/F.conv2d/F.linear call whose weight holds one of the given (compressed)
    values adds its bias delta, rounded as the package stores it: runs a package (runtime) or model with
    simulated weights AND bias-corrected biases, where the op's bias is not a replaceable value (or absent).
    ``deltas``: {:func:`weight_key` of the simulated weight: bias delta (O,)}."""

    def __init__(self, deltas: dict[str, torch.Tensor], precision: str = "fp16") -> None:
        super().__init__()
        self.deltas, self.precision = deltas, precision
        self._keys: dict[int, tuple[torch.Tensor, str]] = {}

    def _delta(self, weight: torch.Tensor) -> torch.Tensor | None:
        found = self._keys.get(id(weight))
        if found is None or found[0] is not weight:
            found = (weight, weight_key(weight))
            self._keys[id(weight)] = found
        return self.deltas.get(found[1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self.deltas and func in (F.conv1d, F.conv2d, torch.conv1d, torch.conv2d, F.linear, torch._C._nn.linear):
            args = list(args)
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            delta = self._delta(weight)
            if delta is not None:
                from .compensate import corrected_bias

                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                new = corrected_bias(None if bias is None else bias.detach().cpu().numpy(), delta, self.precision)
                new = new.to(device=weight.device, dtype=weight.dtype)
                if len(args) > 2:
                    args[2] = new
                else:
                    kwargs["bias"] = new
        return func(*args, **kwargs)
