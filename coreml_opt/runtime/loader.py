"""Read an ML Program package into plain nodes: op type, named arguments (a variable or a decoded value), outputs.

Values come from the protobuf (immediate values) and from ``weight.bin`` through
``coreml_opt.model.program.read_blob_values``; validation of the package is ``open_program``'s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import ModelError
from ..model.package import open_program
from ..model.program import decode_bytes, read_blob_values, weight_file_path


@dataclass(frozen=True)
class Port:
    """A named variable with its static dtype (MIL name, e.g. FLOAT16) and shape (-1 for a flexible dim)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Arg:
    """One argument: a variable read at run time (``var``) or a value stored in the package (``value``)."""

    var: Optional[str] = None
    value: Any = None


@dataclass
class Node:
    """One operation: ``inputs`` maps a parameter to its arguments (several for variadic ones like concat)."""

    type: str
    name: str
    inputs: dict[str, list[Arg]]
    outputs: list[Port]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """The main function: inputs, nodes in program order, output variable names, and static var types."""

    path: Path
    opset: str
    inputs: list[Port]
    outputs: list[str]
    nodes: list[Node]
    ports: dict[str, Port]


def _dtype(value_type) -> str:
    from coremltools.proto import MIL_pb2

    kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        return kind or ""
    return MIL_pb2.DataType.Name(value_type.tensorType.dataType)


def _shape(value_type) -> tuple[int, ...]:
    if value_type.WhichOneof("type") != "tensorType":
        return ()
    return tuple(int(d.constant.size) if d.WhichOneof("dimension") == "constant" else -1
                 for d in value_type.tensorType.dimensions)


def _immediate(value, dtype: str, shape: tuple[int, ...]) -> Any:
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind == "bytes":
        return decode_bytes(tensor.bytes.values, dtype, shape).copy()
    if kind == "strings":
        strings = list(tensor.strings.values)
        return strings[0] if not shape else np.array(strings).reshape(shape)
    raw = list(getattr(tensor, kind).values) if kind else []
    numpy_dtype = {"FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64, "BOOL": np.bool_,
                   "INT64": np.int64, "INT16": np.int16, "UINT16": np.uint16}.get(dtype, np.int32)
    return np.array(raw, dtype=numpy_dtype).reshape(shape)


def decode_value(value, weights: bytes) -> Any:
    """A proto ``Value`` as a numpy array (or str), read inline or from the weight file."""
    dtype, shape = _dtype(value.type), _shape(value.type)
    if value.WhichOneof("value") == "blobFileValue":
        return read_blob_values(weights, int(value.blobFileValue.offset), dtype, shape)
    return _immediate(value, dtype, shape)


def load_graph(path: str | os.PathLike) -> Graph:
    """Parse the default function (``main`` unless the package names another) of an ML Program package;
    ModelError (one line) on a bad package."""
    path = Path(path)
    spec, weights, _program = open_program(path)
    functions = spec.mlProgram.functions
    chosen = spec.description.defaultFunctionName or "main"
    # a protobuf map creates an empty entry on a missing key: an empty opset means "no such function"
    present = sorted(name for name, f in functions.items() if f.opset)
    if chosen not in present:
        raise ModelError(str(path), f"has no {chosen!r} function (functions: {', '.join(present) or 'none'})",
                         "save the model with a 'main' function (coremltools' default)")
    function = functions[chosen]
    if function.opset not in function.block_specializations:
        raise ModelError(str(path), f"has no block for its opset {function.opset!r}", "re-save it with coremltools")
    block = function.block_specializations[function.opset]
    ports: dict[str, Port] = {}
    inputs = []
    for named in function.inputs:
        port = Port(named.name, _dtype(named.type), _shape(named.type))
        inputs.append(port)
        ports[port.name] = port
    nodes = []
    try:
        for op in block.operations:
            args: dict[str, list[Arg]] = {}
            for param, binding in op.inputs.items():
                args[param] = [Arg(var=a.name) if a.name else Arg(value=decode_value(a.value, weights))
                               for a in binding.arguments]
            attrs = {k: decode_value(v, weights) for k, v in op.attributes.items() if k != "name"}
            outputs = [Port(o.name, _dtype(o.type), _shape(o.type)) for o in op.outputs]
            name = outputs[0].name if outputs else op.type
            if "name" in op.attributes:
                name = str(decode_value(op.attributes["name"], weights)) or name
            nodes.append(Node(op.type, name, args, outputs, attrs))
            ports.update((o.name, o) for o in outputs)
    except ValueError as exc:
        raise ModelError(str(weight_file_path(path)), f"is truncated or corrupt: {exc}",
                         "re-export the model; the package was cut short or damaged") from None
    return Graph(path, function.opset, inputs, list(block.outputs), nodes, ports)
