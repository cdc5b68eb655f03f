"""Read an ML Program's ops and the weight-file blobs each op stores, straight from the proto.

Byte counts come from the blob headers in ``weight.bin`` so "stored bytes" means exactly
what the saved package holds (64-byte header + data padded to 64 bytes per blob).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOB_HEADER_BYTES = 64
BLOB_ALIGNMENT = 64
BLOB_SENTINEL = 0xDEADBEEF


def blob_storage_bytes(data_bytes: int) -> int:
    """Bytes one blob takes in ``weight.bin``: metadata header plus data padded to 64 bytes."""
    padded = -(-data_bytes // BLOB_ALIGNMENT) * BLOB_ALIGNMENT
    return BLOB_HEADER_BYTES + padded


@dataclass(frozen=True)
class Blob:
    """One tensor stored in the weight file."""

    role: str  # input or attribute name, e.g. "indices", "lut", "val"
    offset: int
    data_bytes: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def storage_bytes(self) -> int:
        return blob_storage_bytes(self.data_bytes)


@dataclass
class Op:
    """One MIL operation with its named inputs and the blobs it holds inline."""

    type: str
    name: str  # the op's own name (what OptimizationConfig.op_name_configs matches)
    output: str  # its first output variable (what other ops read)
    output_shape: tuple[int, ...]
    output_dtype: str
    inputs: dict[str, list[str]] = field(default_factory=dict)  # input -> producer var names
    blobs: list[Blob] = field(default_factory=list)
    ints: tuple[int, ...] = ()  # an inline integer const's values (e.g. a conv's groups)


@dataclass
class Program:
    """The main function of an ML Program, indexed by output variable name."""

    opset: str
    ops: list[Op]
    producers: dict[str, Op]
    consumers: dict[str, list[tuple[Op, str]]]

    def chain(self, var: str) -> list[Op]:
        """All blob-holding ops feeding ``var`` (the weight's const and constexpr chain)."""
        seen: list[Op] = []
        stack = [var]
        while stack:
            op = self.producers.get(stack.pop())
            if op is None or op in seen:
                continue
            if op.type != "const" and not op.type.startswith("constexpr_"):
                continue
            seen.append(op)
            for names in op.inputs.values():
                stack.extend(names)
        return seen


def _dtype_name(value_type) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(value_type.tensorType.dataType)


def _shape(value_type) -> tuple[int, ...]:
    return tuple(int(d.constant.size) for d in value_type.tensorType.dimensions)


def _read_blob_size(weight_file: bytes, offset: int) -> int:
    if offset + BLOB_HEADER_BYTES > len(weight_file):
        raise ValueError(f"blob at offset {offset} lies past the end of the file ({len(weight_file)} bytes)")
    sentinel, _dtype, size, _data_offset = struct.unpack_from("<IIQQ", weight_file, offset)
    if sentinel != BLOB_SENTINEL:
        raise ValueError(f"no blob header at offset {offset}")
    return int(size)


SUB_BYTE_BITS = {"INT4": 4, "UINT1": 1, "UINT2": 2, "UINT3": 3, "UINT4": 4, "UINT6": 6}
NUMPY_DTYPES = {"FLOAT16": "float16", "FLOAT32": "float32", "FLOAT64": "float64", "INT8": "int8", "UINT8": "uint8",
                "INT16": "int16", "UINT16": "uint16", "INT32": "int32", "UINT32": "uint32", "INT64": "int64",
                "UINT64": "uint64", "BOOL": "bool"}


def decode_bytes(raw: bytes, dtype: str, shape: tuple[int, ...]):
    """Numpy array of ``shape`` from stored bytes of MIL ``dtype``; sub-byte types are packed LSB first
    (coremltools' ``restore_elements_from_packed_bits``), signed INT4 is sign-extended to int8."""
    import numpy as np

    count = int(np.prod(shape, dtype=np.int64))
    if dtype in SUB_BYTE_BITS:
        from coremltools.optimize._utils import restore_elements_from_packed_bits

        packed = np.frombuffer(raw, np.uint8)
        return restore_elements_from_packed_bits(packed, SUB_BYTE_BITS[dtype], count,
                                                 dtype == "INT4").reshape(shape)
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unsupported stored dtype {dtype}")
    return np.frombuffer(raw, NUMPY_DTYPES[dtype], count=count).reshape(shape)


def read_blob_values(weight_file: bytes, offset: int, dtype: str, shape: tuple[int, ...]):
    """The values of the blob whose header sits at ``offset`` in ``weight.bin`` (raises ValueError when cut short)."""
    size = _read_blob_size(weight_file, offset)
    _sentinel, _dtype, _size, data_offset = struct.unpack_from("<IIQQ", weight_file, offset)
    if data_offset + size > len(weight_file):
        raise ValueError(f"blob at offset {offset} needs {data_offset + size} bytes, file has {len(weight_file)}")
    return decode_bytes(bytes(weight_file[data_offset:data_offset + size]), dtype, shape)


def _blob(role: str, value, weight_file: bytes) -> Blob | None:
    if not value.HasField("blobFileValue"):
        return None
    offset = int(value.blobFileValue.offset)
    return Blob(role, offset, _read_blob_size(weight_file, offset), _shape(value.type), _dtype_name(value.type))


def read_program(spec, weight_file: bytes) -> Program:
    """Index the ``main`` function of ``spec`` (a Model proto) against the raw weight file bytes."""
    function = spec.mlProgram.functions["main"]
    opset = function.opset
    block = function.block_specializations[opset]
    ops: list[Op] = []
    producers: dict[str, Op] = {}
    consumers: dict[str, list[tuple[Op, str]]] = {}
    for proto_op in block.operations:
        out = proto_op.outputs[0] if proto_op.outputs else None
        op_name = ""
        if "name" in proto_op.attributes:
            names = proto_op.attributes["name"].immediateValue.tensor.strings.values
            op_name = names[0] if names else ""
        op = Op(
            type=proto_op.type,
            name=op_name or (out.name if out is not None else ""),
            output=out.name if out is not None else "",
            output_shape=_shape(out.type) if out is not None and out.type.HasField("tensorType") else (),
            output_dtype=_dtype_name(out.type) if out is not None and out.type.HasField("tensorType") else "",
        )
        for input_name, binding in proto_op.inputs.items():
            for argument in binding.arguments:
                if argument.name:
                    op.inputs.setdefault(input_name, []).append(argument.name)
                    consumers.setdefault(argument.name, []).append((op, input_name))
                elif argument.HasField("value"):
                    blob = _blob(input_name, argument.value, weight_file)
                    if blob is not None:
                        op.blobs.append(blob)
        if proto_op.type == "const" and "val" in proto_op.attributes:
            op.ints = tuple(proto_op.attributes["val"].immediateValue.tensor.ints.values)
        for attr_name, value in proto_op.attributes.items():
            blob = _blob(attr_name, value, weight_file)
            if blob is not None:
                op.blobs.append(blob)
        ops.append(op)
        for output in proto_op.outputs:
            producers[output.name] = op
    return Program(opset, ops, producers, consumers)


def weight_file_path(package: Path) -> Path:
    """Path of the single weight file of an ``.mlpackage``."""
    return Path(package) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
