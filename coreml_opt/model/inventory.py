"""Weight inventory of an ML Program: every compressible weight, its consumer, bytes and compression."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from ..spec import reader_key
from .program import Op, Program

COMPRESSED_SUFFIX = re.compile(r"(_(palettized|quantized|sparsified)(_pcs)?)+$")
FLOAT_DTYPES = {"FLOAT16": "fp16", "FLOAT32": "fp32"}  # MIL float type -> the label of an uncompressed weight
_NBITS_BY_DTYPE = {"UINT1": 1, "UINT2": 2, "UINT3": 3, "UINT4": 4, "INT4": 4, "UINT6": 6, "UINT8": 8, "INT8": 8}


@dataclass
class WeightInfo:
    """One compressible weight as stored in the package."""

    name: str  # the weight's original const op name, e.g. fc_weight_to_fp16 (``function/...`` outside main)
    var: str  # the variable the consumer reads (name after compression)
    op_type: str
    op_name: str
    shape: tuple[int, ...]
    bytes: int
    compression: str
    torch_name: str | None = None
    consumers: list[tuple[str, str]] = field(default_factory=list)  # (op_type, op_name) of every reader
    readers: str = ""  # spec.reader_key of every reader: "conv", "conv(groups=960)", "conv+conv_transpose"
    dtype: str = "fp16"  # the float type the weight is stored in or decompresses to: fp16 or fp32

    @property
    def reader_type(self) -> str:
        """The op-type key coremltools' skip rules see for this weight (all readers, conv groups)."""
        return self.readers or self.op_type

    @property
    def params(self) -> int:
        return int(math.prod(self.shape))

    @property
    def is_compressed(self) -> bool:
        """False for a plain fp16/fp32 const."""
        return self.compression not in FLOAT_DTYPES.values()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["params"] = self.params
        out["consumers"] = [list(c) for c in self.consumers]
        return out


@dataclass
class Inventory:
    """All weights of a model plus totals."""

    weights: list[WeightInfo]
    deployment_target: int  # iOS major version of the model's opset, e.g. 18
    other_bytes: int = 0  # weight-file bytes not owned by a listed weight (biases, norms, small consts)

    @property
    def total_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    @property
    def total_params(self) -> int:
        return sum(w.params for w in self.weights)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.total_params if self.total_params else 0.0

    def by_name(self) -> dict[str, WeightInfo]:
        return {w.name: w for w in self.weights}

    def to_dict(self) -> dict:
        return {
            "deployment_target": f"iOS{self.deployment_target}",
            "weights": [w.to_dict() for w in self.weights],
            "total_bytes": self.total_bytes,
            "total_params": self.total_params,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "other_bytes": self.other_bytes,
        }


def _describe(program: Program, chain: list[Op], shape: tuple[int, ...], dtype: str) -> str:
    """Human-readable compression of a weight from the constexpr ops that build it (``dtype`` when none)."""
    numel = math.prod(shape) if shape else 1
    sparse = palette = quant = ""
    for op in chain:
        blobs = {b.role: b for b in op.blobs}
        nonzero = blobs.get("nonzero_data") or blobs.get("indices_nonzero_data")
        if op.type in ("constexpr_sparse_to_dense", "constexpr_lut_to_sparse",
                       "constexpr_sparse_blockwise_shift_scale") and nonzero is not None:
            sparse = f"sparse {1.0 - nonzero.shape[0] / numel:.0%}"
        if op.type in ("constexpr_lut_to_dense", "constexpr_lut_to_sparse"):
            palette = _describe_palette(blobs, numel)
        elif op.type in ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize",
                         "constexpr_sparse_blockwise_shift_scale"):
            data = blobs.get("data") or blobs.get("quantized_data") or blobs.get("nonzero_data")
            feeds_lut = any(role == "lut" for _, role in program.consumers.get(op.output, []))
            if data is not None and data.dtype in ("FLOAT16", "FLOAT32"):
                quant = quant or "per-channel scale"
            else:
                qtype = data.dtype.lower() if data is not None else "int8"
                quant = f"lut quantized {qtype}" if feeds_lut else f"quantized {qtype}"
    parts = [p for p in (sparse, palette, quant) if p]
    return " + ".join(parts) if parts else dtype


def _describe_palette(blobs: dict, numel: int) -> str:
    indices = blobs.get("indices") or blobs.get("indices_nonzero_data")
    lut = blobs.get("lut")
    nbits = 0
    if indices is not None and indices.dtype in _NBITS_BY_DTYPE and indices.dtype != "UINT8":
        nbits = _NBITS_BY_DTYPE[indices.dtype]
    elif indices is not None and numel:  # iOS16: indices packed into a flat uint8 array
        nbits = round(indices.data_bytes * 8 / numel)
    text = f"palettized {nbits}-bit" if nbits else "palettized"
    if lut is not None and len(lut.shape) > 2:
        groups = math.prod(lut.shape[:-2])
        if groups > 1:
            text += f" ({groups} LUTs)"
    return text


def build_inventory(program: Program, spec_version: int, torch_names: dict[str, str] | None = None) -> Inventory:
    """List every weight (rank >= 2, stored in the weight file) that feeds a compute op.

    A weight is named by its const op (``op_name_configs`` matches it and coremltools names the
    compressed ops after it). Functions sharing the same blobs (``save_multifunction`` dedups
    identical consts) share one entry, so shared bytes are counted once."""
    torch_names = torch_names or {}
    weights: dict[str, WeightInfo] = {}
    read_by: dict[str, list[tuple[str, int]]] = {}  # weight var -> (op type, groups) of every reader
    by_blobs: dict[tuple[int, ...], WeightInfo] = {}
    owned: set[int] = set()
    for op in program.ops:
        if op.type == "const" or op.type.startswith("constexpr_"):
            continue
        for input_name, var_names in op.inputs.items():
            for var in var_names:
                producer = program.producers.get(var)
                if producer is None or not (producer.type == "const" or producer.type.startswith("constexpr_")):
                    continue
                if len(producer.output_shape) < 2:
                    continue
                chain = program.chain(var)
                blobs = [b for o in chain for b in o.blobs]
                if not blobs:
                    continue
                key = tuple(sorted(b.offset for b in blobs))
                known = weights.get(var) or by_blobs.get(key)
                reader = (op.type, _groups(program, op))
                if known is not None:
                    known.consumers.append((op.type, op.name))
                    read_by[known.var].append(reader)
                    known.readers = reader_key(read_by[known.var])
                    continue
                read_by[var] = [reader]
                name = COMPRESSED_SUFFIX.sub("", producer.name)
                dtype = FLOAT_DTYPES.get(producer.output_dtype, "fp16")
                owned.update(key)
                weights[var] = by_blobs[key] = WeightInfo(
                    name=name, var=var, op_type=op.type, op_name=op.name, shape=producer.output_shape,
                    bytes=sum(b.storage_bytes for b in blobs),
                    compression=_describe(program, chain, producer.output_shape, dtype),
                    torch_name=torch_names.get(name) or torch_names.get(COMPRESSED_SUFFIX.sub("", var)),
                    consumers=[(op.type, op.name)], readers=reader_key([reader]), dtype=dtype,
                )
    all_blobs = {b.offset: b for o in program.ops for b in o.blobs}
    other = sum(b.storage_bytes for off, b in all_blobs.items() if off not in owned)
    return Inventory(list(by_blobs.values()), _ios_version(spec_version), other)


def _groups(program: Program, op: Op) -> int:
    """A conv's or conv_transpose's ``groups`` (1 for other ops or when not an inline const)."""
    names = op.inputs.get("groups", []) if op.type in ("conv", "conv_transpose") else []
    producer = program.producers.get(names[0]) if names else None
    return int(producer.ints[0]) if producer is not None and producer.ints else 1


def _ios_version(spec_version: int) -> int:
    """Core ML specification version -> iOS major version (7 -> 16, 8 -> 17, 9 -> 18)."""
    return {6: 15, 7: 16, 8: 17, 9: 18, 10: 26}.get(spec_version, 9 + spec_version)
