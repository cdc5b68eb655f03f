"""Compression specs: one validated, immutable value per compression choice for one weight.

A spec knows its short string form (``int4/block32``, ``pal3/g16``, ``prune2:4+pal4``), the
minimum deployment target it needs under coremltools 9, the coremltools op config that emits
it, and the exact bytes Core ML stores for a weight of a given shape (see :mod:`coreml_opt.bytes`).

New spec kinds extend this the way torchao configs do: subclass :class:`Spec`, decorate it with
:func:`register_spec`, give it ``parse``/``__str__``/``coreml_config``; nothing else changes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

from .errors import SpecError

QUANT_DTYPES = ("int8", "uint8", "int4", "uint4")
PALETTE_NBITS = (1, 2, 3, 4, 6, 8)
PALETTE_MODES = ("kmeans", "uniform", "unique")
MAGNITUDE_PRUNE_MAX_INDEX = 65520  # fp16(65520) is inf: coremltools' percentile index overflows from here

_SPEC_TYPES: list[type["Spec"]] = []
SPEC_HELP = (
    "use e.g. none, int8, uint8/asym, int8/tensor, int4/block32, pal4, pal3/g16, pal4/uniform, pal6/pcs, "
    "pal2/vec2, unique, prune50, prune75/block4, prune2:4, thresh0.001, prune50+pal4, prune2:4+int8, "
    "pal4+lut8, pal4+aw+bc, pal4/g8+gptq+bc (calibrated)"
)


def register_spec(cls: type["Spec"]) -> type["Spec"]:
    """Class decorator: make a spec kind known to :func:`parse_spec`."""
    _SPEC_TYPES.append(cls)
    return cls


class Spec:
    """Base of every compression spec (frozen dataclasses)."""

    technique: ClassVar[str] = ""  # "quantize" | "palettize" | "prune" | "none" | "joint" | "lut"

    @classmethod
    def parse(cls, text: str) -> "Spec | None":
        """Parse the short form, or return None if ``text`` is not this kind."""
        raise NotImplementedError

    @property
    def min_target(self) -> int:
        """Minimum deployment target as an iOS major version (16, 17, 18)."""
        raise NotImplementedError

    def coreml_config(self, weight_threshold: int = 2048) -> Any:
        """The ``coremltools.optimize.coreml`` op config that emits this spec (None = keep fp16)."""
        raise NotImplementedError

    @property
    def parts(self) -> tuple["Spec", ...]:
        """The single-technique steps, in the order coremltools applies them."""
        return (self,)

    @property
    def is_none(self) -> bool:
        return False

    def shape_problem(self, shape: Sequence[int], op_type: str) -> str | None:
        """Why this spec cannot compress a weight of ``shape`` consumed by ``op_type``, or None."""
        return None


def _options(text: str, prefix_pattern: str) -> tuple[re.Match[str], list[str]] | None:
    head, *options = text.split("/")
    match = re.fullmatch(prefix_pattern, head)
    return (match, options) if match else None


_READER = re.compile(r"([a-z_]+)(?:\(groups=(\d+)\))?")


def reader_key(readers: Sequence[tuple[str, int]]) -> str:
    """One op-type key for a weight from every op that reads it, as ``(op type, conv groups)`` pairs.

    A weight read by one ungrouped op keeps its op type (``conv``); grouped convs add their groups
    (``conv(groups=960)``); a shared weight joins its distinct readers (``conv+conv_transpose``).
    coremltools' skip rules depend on all of them (``select_input_output_channel_axis``,
    ``is_cluster_dim_valid`` in ``coremltools/optimize/_utils.py``)."""
    parts = sorted({f"{t}(groups={g})" if g and g > 1 else t for t, g in readers})
    return "+".join(parts) if parts else "linear"


def readers(op_type: str) -> list[tuple[str, int]]:
    """The ``(op type, groups)`` pairs of a :func:`reader_key` (a plain op type gives one pair)."""
    out = []
    for part in op_type.split("+"):
        match = _READER.fullmatch(part)
        out.append((match.group(1), int(match.group(2) or 1)) if match else (part, 1))
    return out


def channel_axis(op_type: str) -> int:
    """Output-channel axis coremltools uses for a weight consumed by ``op_type`` (a :func:`reader_key`)."""
    return 1 if all(t == "conv_transpose" for t, _ in readers(op_type)) else 0


def input_axis(op_type: str) -> int:
    """Input-channel axis (the axis blocks run along)."""
    return 0 if all(t == "conv_transpose" for t, _ in readers(op_type)) else 1


def reader_problem(spec: "Spec", shape: Sequence[int], op_type: str) -> str | None:
    """Why coremltools 9 skips ``spec`` on a weight because of the ops that read it, or None.

    Mirrors ``select_input_output_channel_axis`` (readers needing different channel axes leave
    quantization and palettization without block sizes) and ``is_cluster_dim_valid`` (vector
    palettization of a grouped conv needs cluster_dim to divide the channels of each group)."""
    ops = readers(op_type)
    for part in spec.parts:
        if part.technique not in ("quantize", "palettize"):
            continue
        if len({channel_axis(t) for t, _ in ops}) > 1:
            names = " and ".join(sorted({t for t, _ in ops}))
            return (f"the weight is shared by {names}, whose channel axes differ, so coremltools skips "
                    f"quantization and palettization of it")
        cluster_dim = getattr(part, "cluster_dim", 1)
        if cluster_dim > 1 and len(shape) > 1:
            axis = channel_axis(op_type)
            for t, groups in ops:
                if t in ("conv", "conv_transpose") and groups > 1:
                    effective = list(shape)
                    effective[0] //= groups
                    if effective[axis] % cluster_dim:
                        return (f"cluster_dim {cluster_dim} does not divide the {effective[axis]} channel(s) of "
                                f"each group of the grouped {t} (groups={groups}), so coremltools skips it")
    return None


@register_spec
@dataclass(frozen=True)
class NoneSpec(Spec):
    """Leave the weight in fp16."""

    technique: ClassVar[str] = "none"

    @classmethod
    def parse(cls, text: str) -> "Spec | None":
        return cls() if text in ("none", "fp16", "skip") else None

    def __str__(self) -> str:
        return "none"

    @property
    def min_target(self) -> int:
        return 16

    @property
    def is_none(self) -> bool:
        return True

    def coreml_config(self, weight_threshold: int = 2048) -> Any:
        return None


@register_spec
@dataclass(frozen=True)
class QuantSpec(Spec):
    """Linear weight quantization (``OpLinearQuantizerConfig``)."""

    dtype: str = "int8"
    mode: str = "linear_symmetric"  # or "linear" (asymmetric, stores a zero point)
    granularity: str = "per_channel"  # per_tensor | per_channel | per_block
    block_size: int | None = None
    technique: ClassVar[str] = "quantize"

    def __post_init__(self) -> None:
        if self.dtype not in QUANT_DTYPES:
            raise SpecError(f"dtype {self.dtype!r}", "is not a quantization dtype", f"use one of {QUANT_DTYPES}")
        if self.mode not in ("linear_symmetric", "linear"):
            raise SpecError(f"mode {self.mode!r}", "is not a quantization mode", "use linear_symmetric or linear")
        if self.granularity not in ("per_tensor", "per_channel", "per_block"):
            raise SpecError(f"granularity {self.granularity!r}", "is unknown", "use per_tensor, per_channel or per_block")
        if (self.granularity == "per_block") != (self.block_size is not None):
            raise SpecError(str(self.block_size), "block_size goes with per_block granularity only", "write e.g. int4/block32")
        if self.block_size is not None and self.block_size < 1:
            raise SpecError(f"block{self.block_size}", "block size must be positive", "use e.g. block32")

    @classmethod
    def parse(cls, text: str) -> "Spec | None":
        found = _options(text, r"(u?int)(8|4)")
        if not found:
            return None
        match, options = found
        kwargs: dict[str, Any] = {"dtype": match.group(0)}
        for option in options:
            if option == "asym":
                kwargs["mode"] = "linear"
            elif option == "tensor":
                kwargs["granularity"] = "per_tensor"
            elif option == "channel":
                kwargs["granularity"] = "per_channel"
            elif m := re.fullmatch(r"block(\d+)", option):
                kwargs.update(granularity="per_block", block_size=int(m.group(1)))
            else:
                raise SpecError(f"spec {text!r}", f"unknown quantization option {option!r}", "use /asym, /tensor, /channel or /blockN")
        return cls(**kwargs)

    def __str__(self) -> str:
        out = self.dtype
        if self.granularity == "per_tensor":
            out += "/tensor"
        elif self.granularity == "per_block":
            out += f"/block{self.block_size}"
        if self.mode == "linear":
            out += "/asym"
        return out

    @property
    def nbits(self) -> int:
        return 8 if self.dtype.endswith("8") else 4

    @property
    def min_target(self) -> int:
        return 18 if self.nbits == 4 or self.granularity == "per_block" else 16

    def coreml_config(self, weight_threshold: int = 2048) -> Any:
        from coremltools.optimize.coreml import OpLinearQuantizerConfig

        kwargs: dict[str, Any] = dict(mode=self.mode, dtype=self.dtype, granularity=self.granularity,
                                      weight_threshold=weight_threshold)
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        return OpLinearQuantizerConfig(**kwargs)

    def shape_problem(self, shape: Sequence[int], op_type: str) -> str | None:
        if problem := reader_problem(self, shape, op_type):
            return problem
        if self.granularity == "per_block":
            axis = input_axis(op_type)
            if len(shape) <= axis or shape[axis] % self.block_size:
                dim = shape[axis] if len(shape) > axis else None
                return f"block size {self.block_size} does not divide input-channel dim {dim}"
        return None


@register_spec
@dataclass(frozen=True)
class PalettizeSpec(Spec):
    """Weight palettization to a look-up table (``OpPalettizerConfig``)."""

    nbits: int | None = 4
    mode: str = "kmeans"
    granularity: str = "per_tensor"  # or per_grouped_channel
    group_size: int | None = None
    per_channel_scale: bool = False
    cluster_dim: int = 1
    technique: ClassVar[str] = "palettize"

    def __post_init__(self) -> None:
        if self.mode not in PALETTE_MODES:
            raise SpecError(f"mode {self.mode!r}", "is not a palettization mode", f"use one of {PALETTE_MODES}")
        if self.mode == "unique":
            if self.nbits is not None:
                raise SpecError("unique", "unique mode infers nbits from the weight", "write plain 'unique'")
        elif self.nbits not in PALETTE_NBITS:
            raise SpecError(f"pal{self.nbits}", "unsupported palette size", f"use nbits in {PALETTE_NBITS}")
        if (self.granularity == "per_grouped_channel") != (self.group_size is not None):
            raise SpecError(str(self.group_size), "group_size goes with per_grouped_channel only", "write e.g. pal4/g16")
        if self.group_size is not None and self.group_size < 1:
            raise SpecError(f"g{self.group_size}", "group size must be positive", "use e.g. g16")
        if self.cluster_dim < 1:
            raise SpecError(f"vec{self.cluster_dim}", "cluster_dim must be positive", "use e.g. vec2")

    @classmethod
    def parse(cls, text: str) -> "Spec | None":
        found = _options(text, r"pal(\d+)|unique")
        if not found:
            return None
        match, options = found
        kwargs: dict[str, Any] = {"nbits": int(match.group(1))} if match.group(1) else {"nbits": None, "mode": "unique"}
        for option in options:
            if option in ("uniform", "kmeans"):
                kwargs["mode"] = option
            elif option == "pcs":
                kwargs["per_channel_scale"] = True
            elif option == "tensor":
                kwargs["granularity"] = "per_tensor"
            elif m := re.fullmatch(r"g(\d+)", option):
                kwargs.update(granularity="per_grouped_channel", group_size=int(m.group(1)))
            elif m := re.fullmatch(r"vec(\d+)", option):
                kwargs["cluster_dim"] = int(m.group(1))
            else:
                raise SpecError(f"spec {text!r}", f"unknown palettization option {option!r}",
                                "use /gN, /uniform, /pcs or /vecN")
        return cls(**kwargs)

    def __str__(self) -> str:
        out = "unique" if self.mode == "unique" else f"pal{self.nbits}"
        if self.group_size is not None:
            out += f"/g{self.group_size}"
        if self.mode == "uniform":
            out += "/uniform"
        if self.per_channel_scale:
            out += "/pcs"
        if self.cluster_dim > 1:
            out += f"/vec{self.cluster_dim}"
        return out

    @property
    def min_target(self) -> int:
        if (self.granularity == "per_grouped_channel" or self.nbits == 3 or self.cluster_dim > 1
                or self.per_channel_scale):
            return 18
        return 16

    def coreml_config(self, weight_threshold: int = 2048, lut_function: Callable | None = None) -> Any:
        from coremltools.optimize.coreml import OpPalettizerConfig

        kwargs: dict[str, Any] = dict(mode=self.mode, granularity=self.granularity,
                                      enable_per_channel_scale=self.per_channel_scale,
                                      cluster_dim=self.cluster_dim, weight_threshold=weight_threshold)
        if lut_function is not None:
            kwargs.update(mode="custom", lut_function=lut_function)
        elif self.nbits is not None:
            kwargs["nbits"] = self.nbits
        if self.group_size is not None:
            kwargs["group_size"] = self.group_size
        return OpPalettizerConfig(**kwargs)

    def shape_problem(self, shape: Sequence[int], op_type: str) -> str | None:
        if problem := reader_problem(self, shape, op_type):
            return problem
        axis = channel_axis(op_type)
        channels = shape[axis] if len(shape) > axis else 1
        if self.group_size is not None and channels % self.group_size:
            return f"group size {self.group_size} does not divide output-channel dim {channels}"
        if self.cluster_dim > 1 and channels % self.cluster_dim:
            return f"cluster_dim {self.cluster_dim} does not divide output-channel dim {channels}"
        if self.cluster_dim > 1 and self.group_size is not None and self.group_size % self.cluster_dim:
            return f"cluster_dim {self.cluster_dim} does not divide group size {self.group_size}"
        return None


@register_spec
@dataclass(frozen=True)
class PruneSpec(Spec):
    """Magnitude pruning to a target sparsity, in blocks, or n:m (``OpMagnitudePrunerConfig``)."""

    target_sparsity: float | None = 0.5
    n_m: tuple[int, int] | None = None
    block_size: int | None = None
    technique: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        if (self.target_sparsity is None) == (self.n_m is None):
            raise SpecError("prune", "give exactly one of a target sparsity and an n:m ratio", "write prune50 or prune2:4")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity <= 1.0:
            raise SpecError(f"prune{self.target_sparsity * 100:g}", "sparsity must be 0..100 %", "use e.g. prune50")
        if self.n_m is not None and not 0 < self.n_m[0] <= self.n_m[1]:
            raise SpecError(f"prune{self.n_m[0]}:{self.n_m[1]}", "n must be in 1..m", "use e.g. prune2:4")
        if self.n_m is not None and self.block_size is not None:
            raise SpecError(str(self), "block size and n:m cannot be combined", "drop one of them")
        if self.block_size is not None and self.block_size < 2:
            raise SpecError(f"block{self.block_size}", "pruning block size must be at least 2", "use e.g. block4")

    @classmethod
    def parse(cls, text: str) -> "Spec | None":
        found = _options(text, r"prune(?:(\d+(?:\.\d+)?)|(\d+):(\d+))")
        if not found:
            return None
        match, options = found
        kwargs: dict[str, Any] = {}
        if match.group(1) is not None:
            kwargs["target_sparsity"] = float(match.group(1)) / 100.0
        else:
            kwargs.update(target_sparsity=None, n_m=(int(match.group(2)), int(match.group(3))))
        for option in options:
            if m := re.fullmatch(r"block(\d+)", option):
                kwargs["block_size"] = int(m.group(1))
            else:
                raise SpecError(f"spec {text!r}", f"unknown pruning option {option!r}", "use /blockN")
        return cls(**kwargs)

    def __str__(self) -> str:
        if self.n_m is not None:
            return f"prune{self.n_m[0]}:{self.n_m[1]}"
        out = f"prune{self.target_sparsity * 100:g}"
        return out + (f"/block{self.block_size}" if self.block_size else "")

    @property
    def sparsity(self) -> float:
        return self.target_sparsity if self.n_m is None else self.n_m[0] / self.n_m[1]

    @property
    def min_target(self) -> int:
        return 16

    def coreml_config(self, weight_threshold: int = 2048) -> Any:
        from coremltools.optimize.coreml import OpMagnitudePrunerConfig

        if self.n_m is not None:
            return OpMagnitudePrunerConfig(n_m_ratio=self.n_m, weight_threshold=weight_threshold)
        return OpMagnitudePrunerConfig(target_sparsity=self.target_sparsity, block_size=self.block_size,
                                       weight_threshold=weight_threshold)

    def shape_problem(self, shape: Sequence[int], op_type: str) -> str | None:
        if (self.block_size or self.n_m) and any(t not in ("conv", "linear") for t, _ in readers(op_type)):
            return f"block and n:m pruning apply to conv and linear weights only, not {op_type}"
        numel = math.prod(shape)
        if self.n_m is None and numel - 1 >= MAGNITUDE_PRUNE_MAX_INDEX:
            # coremltools takes np.percentile of the fp16 magnitudes; the fp16 index overflows to inf,
            # the threshold becomes NaN and nothing is pruned (the "sparse" weight is larger than fp16).
            return (f"coremltools 9 magnitude-prunes nothing in a weight of {numel} values (above 65,520 its "
                    "fp16 percentile overflows), so use n:m (e.g. prune2:4) or threshold pruning here")
        if self.block_size is not None and self.block_size > shape[0] / 2:
            return f"pruning block size {self.block_size} exceeds half the output channels ({shape[0]})"
        if self.n_m is not None and (len(shape) < 2 or self.n_m[1] > shape[1] / 2):
            dim = shape[1] if len(shape) > 1 else None
            return f"n:m with m={self.n_m[1]} needs at least {2 * self.n_m[1]} input channels, got {dim}"
        return None


@register_spec
@dataclass(frozen=True)
class ThresholdPruneSpec(Spec):
    """Zero every weight with |w| below a threshold (``OpThresholdPrunerConfig``)."""

    threshold: float = 1e-3
    minimum_sparsity_percentile: float = 0.5
    technique: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise SpecError(f"thresh{self.threshold:g}", "threshold must be non-negative", "use e.g. thresh0.001")
        if not 0.0 <= self.minimum_sparsity_percentile <= 1.0:
            raise SpecError(f"min{self.minimum_sparsity_percentile * 100:g}", "must be 0..100 %", "use e.g. /min50")

    @classmethod
    def parse(cls, text: str) -> "Spec | None":
        found = _options(text, r"thresh(\d+(?:\.\d*)?(?:e-?\d+)?)")
        if not found:
            return None
        match, options = found
        kwargs: dict[str, Any] = {"threshold": float(match.group(1))}
        for option in options:
            if m := re.fullmatch(r"min(\d+(?:\.\d+)?)", option):
                kwargs["minimum_sparsity_percentile"] = float(m.group(1)) / 100.0
            else:
                raise SpecError(f"spec {text!r}", f"unknown threshold-pruning option {option!r}", "use /minN")
        return cls(**kwargs)

    def __str__(self) -> str:
        out = f"thresh{self.threshold:g}"
        return out if self.minimum_sparsity_percentile == 0.5 else out + f"/min{self.minimum_sparsity_percentile * 100:g}"

    @property
    def min_target(self) -> int:
        return 16

    def coreml_config(self, weight_threshold: int = 2048) -> Any:
        from coremltools.optimize.coreml import OpThresholdPrunerConfig

        return OpThresholdPrunerConfig(threshold=self.threshold,
                                       minimum_sparsity_percentile=self.minimum_sparsity_percentile,
                                       weight_threshold=weight_threshold)


@register_spec
@dataclass(frozen=True)
class LutQuantSpec(Spec):
    """Quantize a palettization LUT to 8 bits (joint only: ``pal4+lut8``), per tensor."""

    dtype: str = "int8"
    technique: ClassVar[str] = "lut"

    def __post_init__(self) -> None:
        if self.dtype not in ("int8", "uint8"):
            raise SpecError(f"lut dtype {self.dtype!r}", "LUTs quantize to 8 bits only", "use lut8 or lutu8")

    @classmethod
    def parse(cls, text: str) -> "Spec | None":
        return {"lut8": cls("int8"), "lutu8": cls("uint8")}.get(text)

    def __str__(self) -> str:
        return "lut8" if self.dtype == "int8" else "lutu8"

    @property
    def min_target(self) -> int:
        return 18

    def coreml_config(self, weight_threshold: int = 2048) -> Any:
        from coremltools.optimize.coreml import OpLinearQuantizerConfig

        # In joint mode coremltools applies the threshold to the dense weight behind the LUT.
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype=self.dtype, granularity="per_tensor",
                                       weight_threshold=weight_threshold)


_JOINT_ORDER = {"prune": 0, "palettize": 1, "quantize": 1, "lut": 2}
_JOINT_FORMS = {("prune", "palettize"), ("prune", "quantize"), ("palettize", "lut"), ("prune", "palettize", "lut")}


@dataclass(frozen=True)
class JointSpec(Spec):
    """Joint compression: coremltools passes chained with ``joint_compression=True`` (iOS18)."""

    steps: tuple[Spec, ...] = field(default_factory=tuple)
    technique: ClassVar[str] = "joint"

    def __post_init__(self) -> None:
        kinds = tuple(step.technique for step in self.steps)
        if kinds not in _JOINT_FORMS:
            raise SpecError(f"spec {str(self)!r}", "is not a joint form coremltools supports",
                            "use prune+palN, prune+intN, palN+lut8 or prune+palN+lut8")
        for step in self.steps:
            if isinstance(step, PalettizeSpec) and step.cluster_dim > 1 and kinds[0] == "prune":
                raise SpecError(f"spec {str(self)!r}", "coremltools 9 fails to palettize a pruned weight with vectors "
                                "(IndexError in constexpr_lut_to_sparse)", "drop /vecN or the pruning step")
            if isinstance(step, PalettizeSpec) and step.per_channel_scale:
                raise SpecError(f"spec {str(self)!r}", "per-channel scale cannot be combined in joint compression",
                                "drop /pcs")

    def __str__(self) -> str:
        return "+".join(str(step) for step in self.steps)

    @property
    def parts(self) -> tuple[Spec, ...]:
        return self.steps

    @property
    def min_target(self) -> int:
        return 18

    def coreml_config(self, weight_threshold: int = 2048) -> Any:
        raise SpecError(str(self), "joint specs are a sequence of passes, not one config", "use parts")

    def shape_problem(self, shape: Sequence[int], op_type: str) -> str | None:
        for step in self.steps:
            if problem := step.shape_problem(shape, op_type):
                return problem
        return None


COMPENSATIONS = {"aw": "activation-aware LUT (k-means weighted by E[x^2])",
                 "gptq": "GPTQ error feedback with a least-squares LUT refit (from E[x x^T])",
                 "bc": "bias correction (b - (W_q - W) E[x])"}


@dataclass(frozen=True)
class CompensatedSpec(Spec):
    """A spec plus error compensation from calibration statistics (unlabeled data): ``pal4+aw``,
    ``int4/block32+bc``, ``pal4/g16+aw+bc``, ``pal4/g8+gptq+bc``. Same stored weight bytes as ``base``; ``bc``
    rewrites the reading op's bias, ``aw`` chooses the LUT by k-means weighted by each weight's E[x^2], ``gptq``
    chooses indices column by column with GPTQ's error feedback and refits the LUT by least squares."""

    base: Spec = field(default_factory=NoneSpec)
    activation_aware: bool = False
    bias_correction: bool = False
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if not (self.activation_aware or self.bias_correction or self.error_feedback):
            raise SpecError(str(self.base), "a compensated spec needs +aw, +gptq or +bc", "write e.g. pal4+bc")
        if self.activation_aware and self.error_feedback:
            raise SpecError(f"spec {str(self)!r}", "+gptq already starts from the activation-aware LUT",
                            "drop +aw, e.g. pal4/g8+gptq+bc")
        if self.base.is_none or isinstance(self.base, CompensatedSpec):
            raise SpecError(f"spec {str(self)!r}", "compensation needs one compression to compensate",
                            "write it after a spec, e.g. pal4+aw+bc")
        if self.calibrated_lut and not (
                isinstance(self.base, PalettizeSpec) and self.base.mode == "kmeans" and self.base.cluster_dim == 1):
            flag = "+aw weights the k-means of" if self.activation_aware else "+gptq chooses the indices of"
            raise SpecError(f"spec {str(self)!r}", f"{flag} a scalar LUT",
                            "use it after palN, palN/gK or palN/pcs (k-means, no /vecN, no joint form)")

    @property
    def technique(self) -> str:  # type: ignore[override]
        return self.base.technique

    @property
    def mode(self) -> str | None:
        return getattr(self.base, "mode", None)

    @property
    def cluster_dim(self) -> int:
        return getattr(self.base, "cluster_dim", 1)

    @property
    def nbits(self) -> int | None:
        return getattr(self.base, "nbits", None)

    @property
    def calibrated_lut(self) -> bool:
        """Whether the LUT and indices come from the calibration statistics (``+aw``, ``+gptq``), so the package
        gets them through a ``lut_function`` rather than coremltools' own k-means."""
        return self.activation_aware or self.error_feedback

    def __str__(self) -> str:
        return (str(self.base) + ("+aw" if self.activation_aware else "") + ("+gptq" if self.error_feedback else "")
                + ("+bc" if self.bias_correction else ""))

    @property
    def parts(self) -> tuple[Spec, ...]:
        return (self,) if not isinstance(self.base, JointSpec) else self.base.parts

    @property
    def min_target(self) -> int:
        return self.base.min_target

    def coreml_config(self, weight_threshold: int = 2048, lut_function: Callable | None = None) -> Any:
        if lut_function is not None:
            return self.base.coreml_config(weight_threshold, lut_function=lut_function)
        if self.calibrated_lut:
            raise SpecError(str(self), "a calibrated LUT (+aw, +gptq) is shipped through its own lut_function",
                            "compress it with coreml_opt.compress.compress(..., statistics=...)")
        return self.base.coreml_config(weight_threshold)

    def shape_problem(self, shape: Sequence[int], op_type: str) -> str | None:
        for used, what, why_one_op in ((self.error_feedback, "GPTQ error feedback", "one input Hessian"),
                                       (self.bias_correction, "bias correction", "its bias is that op's")):
            if used and any(t not in ("conv", "linear") for t, _ in readers(op_type)):
                return f"{what} applies to weights read by conv and linear ops only, not {op_type}"
            if used and "+" in op_type:
                return f"{what} needs a weight read by one op ({why_one_op})"
        return self.base.shape_problem(shape, op_type)


def parse_spec(text: str | Spec) -> Spec:
    """Parse a short spec string (``int4/block32``, ``prune2:4+pal4``, ``pal4+aw+bc``) into a validated spec."""
    if isinstance(text, Spec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"spec {text!r}", "is empty or not a string", SPEC_HELP)
    cleaned = text.strip().lower()
    pieces = cleaned.split("+")
    flags = []
    while len(pieces) > 1 and pieces[-1] in COMPENSATIONS:
        flags.append(pieces.pop())
    if flags:
        if len(set(flags)) < len(flags):
            raise SpecError(f"spec {text!r}", "repeats a compensation", "write each of +aw, +gptq, +bc once")
        return CompensatedSpec(parse_spec("+".join(pieces)), "aw" in flags, "bc" in flags, "gptq" in flags)
    steps = [_parse_one(piece, text) for piece in pieces]
    if len(steps) == 1:
        if isinstance(steps[0], LutQuantSpec):
            raise SpecError(f"spec {text!r}", "lut8 only quantizes a palette", "write it after a palette, e.g. pal4+lut8")
        return steps[0]
    if any(step.is_none for step in steps):
        raise SpecError(f"spec {text!r}", "'none' cannot be combined", "write none alone")
    return JointSpec(tuple(steps))


def _parse_one(piece: str, whole: str) -> Spec:
    for spec_type in _SPEC_TYPES:
        spec = spec_type.parse(piece)
        if spec is not None:
            return spec
    raise SpecError(f"spec {whole!r}", f"{piece!r} is not a known compression", SPEC_HELP)
