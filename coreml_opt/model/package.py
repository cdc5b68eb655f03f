"""Open, validate and atomically save ``.mlpackage`` models.

Every check runs before any work so a bad input fails with one line naming the file, the problem
and the fix, and a failed or interrupted save never leaves a partial package at the output path.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ModelError
from .inventory import Inventory, build_inventory
from .program import BLOB_HEADER_BYTES, Program, read_program, weight_file_path

logger = logging.getLogger(__name__)

TORCH_NAMES_KEY = "coreml_opt.torch_names"
_MANIFEST_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/coreml-opt/manifest")


@dataclass
class LoadedModel:
    """An opened ML Program package: the coremltools model, its program index and inventory."""

    path: Path
    mlmodel: object  # coremltools.models.MLModel
    program: Program
    inventory: Inventory

    @property
    def torch_names(self) -> dict[str, str]:
        return {w.name: w.torch_name for w in self.inventory.weights if w.torch_name}

    def weight_values(self, name: str):
        """The stored value of an uncompressed (fp16/fp32) weight, read from the weight file."""
        import numpy as np

        weight = self.inventory.by_name()[name]
        op = self.program.producers[weight.var]
        if op.type != "const" or len(op.blobs) != 1 or op.blobs[0].dtype not in ("FLOAT16", "FLOAT32"):
            raise ValueError(f"{name} is compressed; only fp16/fp32 weights can be read back")
        blob = op.blobs[0]
        dtype = np.float16 if blob.dtype == "FLOAT16" else np.float32
        with open(weight_file_path(self.path), "rb") as handle:
            handle.seek(blob.offset + BLOB_HEADER_BYTES)
            data = handle.read(blob.data_bytes)
        return np.frombuffer(data, dtype=dtype).reshape(blob.shape)


def read_torch_names(model) -> dict[str, str]:
    """Core ML const name -> PyTorch parameter path, stored by ``coreml-opt convert``.

    ``model`` is an MLModel or a Model proto (spec)."""
    spec = model.get_spec() if hasattr(model, "get_spec") else model
    raw = spec.description.metadata.userDefined.get(TORCH_NAMES_KEY)
    if not raw:
        return {}
    try:
        return dict(json.loads(raw))
    except (ValueError, TypeError):
        logger.warning("ignoring unreadable %s metadata", TORCH_NAMES_KEY)
        return {}


def _model_proto_path(path: Path) -> Path:
    manifest = path / "Manifest.json"
    if not manifest.is_file():
        raise ModelError(str(path), "is a folder but not an .mlpackage (no Manifest.json)",
                         "pass the .mlpackage produced by coremltools or `coreml-opt convert`")
    try:
        info = json.loads(manifest.read_text())
        root = info["rootModelIdentifier"]
        proto = path / "Data" / info["itemInfoEntries"][root]["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(str(path / "Manifest.json"), f"is corrupt ({exc.__class__.__name__})",
                         "re-save the model with coremltools") from None
    if not proto.is_file():
        raise ModelError(str(path), f"is missing its model file {proto.relative_to(path)}",
                         "re-save the model with coremltools")
    return proto


def _check_blobs(path: Path, program: Program, weights: bytes) -> None:
    for op in program.ops:
        for blob in op.blobs:
            end = blob.offset + BLOB_HEADER_BYTES + blob.data_bytes
            if end > len(weights):
                raise ModelError(str(weight_file_path(path)),
                                 f"is truncated: weight {op.name!r} needs {end} bytes, file has {len(weights)}",
                                 "re-export the model; the package was cut short when copied or saved")


def open_program(path: str | os.PathLike) -> tuple[object, bytes, Program]:
    """(Model proto, weight.bin bytes, program index) of a validated ML Program package; ModelError otherwise."""
    from coremltools.proto import Model_pb2

    path = Path(path)
    if not path.exists():
        raise ModelError(str(path), "does not exist", "check the path, or create it with `coreml-opt convert`")
    if path.is_file():
        problem = "is an .mlmodel file (neuralnetwork or legacy format)" if path.suffix == ".mlmodel" \
            else "is a file, not an .mlpackage folder"
        raise ModelError(str(path), problem, "convert the PyTorch model with `coreml-opt convert` to an ML Program")
    proto_path = _model_proto_path(path)
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(proto_path.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(str(proto_path), f"cannot be parsed ({exc.__class__.__name__})",
                         "the package is corrupt; re-save it with coremltools") from None
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise ModelError(str(path), f"is a {kind or 'empty'} model, not an ML Program",
                         "reconvert with convert_to='mlprogram' (e.g. `coreml-opt convert`)")
    weights_path = weight_file_path(path)
    weights = weights_path.read_bytes() if weights_path.is_file() else b""
    try:
        program = read_program(spec, weights)
    except (ValueError, struct.error) as exc:
        raise ModelError(str(weights_path), f"is truncated or corrupt: {exc}",
                         "re-export the model; the package was cut short or damaged when copied or saved") from None
    _check_blobs(path, program, weights)
    return spec, weights, program


def load_package(path: str | os.PathLike, *, load_weights: bool = True) -> LoadedModel:
    """Open and validate an ``.mlpackage`` (ML Program), raising a one-line ModelError on bad input."""
    from coremltools.models import MLModel

    path = Path(path)
    spec, _weights, program = open_program(path)
    mlmodel = MLModel(str(path), skip_model_load=True) if load_weights else None
    inventory = build_inventory(program, spec.specificationVersion, read_torch_names(spec))
    return LoadedModel(path, mlmodel, program, inventory)


def inventory_of(mlmodel) -> Inventory:
    """Inventory of an in-memory MLModel (saved to a temporary package to read the weight file)."""
    with tempfile.TemporaryDirectory(prefix="coreml-opt-") as tmp:
        target = Path(tmp) / "model.mlpackage"
        mlmodel.save(str(target))
        return load_package(target, load_weights=False).inventory


def normalize_package(package: str | os.PathLike) -> None:
    """Make a saved package reproducible: path-derived Manifest.json identifiers (coremltools writes random
    UUIDs) and map entries of the model protobuf in sorted order (protobuf's default order varies per process)."""
    from coremltools.proto import Model_pb2

    manifest = Path(package) / "Manifest.json"
    data = json.loads(manifest.read_text())
    renamed = {key: str(uuid.uuid5(_MANIFEST_NAMESPACE, entry["path"])) for key, entry in data["itemInfoEntries"].items()}
    data["itemInfoEntries"] = {renamed[k]: v for k, v in data["itemInfoEntries"].items()}
    root = data["itemInfoEntries"][renamed[data["rootModelIdentifier"]]]
    data["rootModelIdentifier"] = renamed[data["rootModelIdentifier"]]
    manifest.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")
    proto_path = Path(package) / "Data" / root["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(proto_path.read_bytes())
    proto_path.write_bytes(spec.SerializeToString(deterministic=True))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp_path = tmp_dir / path.name
    try:
        yield tmp_path
        if not tmp_path.exists():
            raise RuntimeError(f"nothing was written for {path}")
        backup = None
        if path.exists():  # a folder cannot be replaced over a non-empty one: move the old one aside
            backup = tmp_dir / (path.name + ".old")
            os.replace(path, backup)
        try:
            os.replace(tmp_path, path)
        except BaseException:
            if backup is not None and not path.exists():
                os.replace(backup, path)  # put the user's previous output back
            raise
    finally:  # runs on success, error and KeyboardInterrupt alike
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_package(mlmodel, path: str | os.PathLike) -> Path:
    """Save an MLModel to ``path`` atomically (no partial package on error or Ctrl-C)."""
    with atomic_output(path) as tmp:
        mlmodel.save(str(tmp))
    return Path(path)
