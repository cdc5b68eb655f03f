"""Open, validate and atomically save ``.mlpackage`` models.

Every check runs before any work so a bad input fails with one line naming the file, the problem
and the fix, and a failed or interrupted save never leaves a partial package at the output path.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ModelError, OutputError
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


PACKAGE_SUFFIX = ".mlpackage"
# Errors that mean "this output cannot be written here": the user's to fix, so one line, never a traceback.
_OUTPUT_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a folder on its path is a file",
                  errno.EEXIST: "a folder on its path is a file"}
# The rest of a temp folder's name after ".NAME.": "PID.XXXXXXXX.tmp" (or "XXXXXXXX.tmp" from older versions).
_TEMP_NAME = re.compile(r"(?:(\d+)\.)?[a-z0-9_]{8}\.tmp")
_STALE_UNKNOWN_OWNER_S = 3600  # temp folders whose writer cannot be told are stale after an hour


def check_package_output(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse, before any work, an output that is not an ``.mlpackage`` path or that overlaps an input package
    (the same path, inside it, or holding it: replacing the output would destroy the input)."""
    path = Path(output)
    if path.suffix != PACKAGE_SUFFIX:
        why = ("is an .mlmodel path, a format ML Programs cannot be saved in" if path.suffix == ".mlmodel"
               else f"does not end in {PACKAGE_SUFFIX}" + (f" (it ends in {path.suffix})" if path.suffix else ""))
        raise OutputError(str(output), why, f"name the output {path.with_suffix(PACKAGE_SUFFIX).name}")
    check_output_folder(path)
    out = path.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out == src:
            raise OutputError(str(output), "is the input model", "write the result to a new .mlpackage path")
        if src in out.parents:
            raise OutputError(str(output), f"is inside the input package {source}",
                              "write the result outside the input .mlpackage")
        if out in src.parents:
            raise OutputError(str(output), f"holds the input model {source}; replacing it would delete the input",
                              "write the result to a new .mlpackage path")
    return path


def check_output_folder(output: str | os.PathLike) -> None:
    """Refuse, before any work, an output whose folder cannot be created or written (a file on its path, no
    write permission); a full disk is only found while writing (see :func:`atomic_output`)."""
    path = Path(output).absolute()
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise _output_error(path, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _output_error(path, OSError(errno.EACCES, os.strerror(errno.EACCES), str(folder)))


def make_output_folder(folder: str | os.PathLike) -> Path:
    """Create an output folder (and its parents), or raise a one-line OutputError naming it."""
    folder = Path(folder)
    check_output_folder(folder / "-")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _OUTPUT_ERRNOS:
            raise _output_error(folder / "-", exc) from None
        raise
    return folder


def _output_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(str(path), f"cannot be written: {_OUTPUT_ERRNOS[exc.errno]} (in {path.parent})",
                       "free space or choose a writable folder for the output" if exc.errno in
                       (errno.ENOSPC, errno.EDQUOT) else "choose a writable folder for the output")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_outputs(path: str | os.PathLike) -> list[Path]:
    """Remove temp folders that killed earlier writes of ``path`` left beside it (``.NAME.PID.XXXX.tmp``, the
    writer's process gone); if the kill fell between moving the old output aside and the new one in, the old
    output is put back first. Returns the folders removed."""
    path = Path(path)
    removed = []
    prefix = _temp_prefix(path)
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for tmp_dir in siblings:
        name = tmp_dir.name
        match = _TEMP_NAME.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if match is None or not tmp_dir.is_dir():
            continue
        if match.group(1):
            owner = int(match.group(1))
            if owner == os.getpid() or _pid_alive(owner):
                continue
        else:  # written by an older version (no pid in the name): stale once old
            try:
                if time.time() - tmp_dir.stat().st_mtime < _STALE_UNKNOWN_OWNER_S:
                    continue
            except OSError:
                continue
        backup = tmp_dir / (path.name + ".old")
        if backup.exists() and not os.path.lexists(path):
            os.replace(backup, path)
            logger.warning("restored %s from an interrupted earlier write", path)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        logger.info("removed %s left by an interrupted earlier write", tmp_dir)
        removed.append(tmp_dir)
    return removed


def _exchange(new: Path, old: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(old))


def _move_into_place(tmp_path: Path, path: Path, tmp_dir: Path) -> None:
    """Put ``tmp_path`` at ``path``; an existing output stays in place until the new one replaces it."""
    if not os.path.lexists(path) or (path.is_file() and tmp_path.is_file()):
        os.replace(tmp_path, path)  # atomic for a new path or a file over a file
        return
    if _exchange(tmp_path, path):  # the old output is now in tmp_dir and is removed with it
        return
    backup = tmp_dir / (path.name + ".old")  # no exchange: move the old one aside (restored if killed here)
    os.replace(path, backup)
    try:
        os.replace(tmp_path, path)
    except BaseException:
        if not os.path.lexists(path):
            os.replace(backup, path)  # put the user's previous output back
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Nothing partial ever appears at ``path``, and the old output stays there until the new one replaces it.
    Temp folders of killed earlier writes are removed here; an unwritable folder or a full disk (while
    writing, too) raises a one-line OutputError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_outputs(path)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp",
                                        dir=path.parent))
    except OSError as exc:
        if exc.errno in _OUTPUT_ERRNOS:
            raise _output_error(path, exc) from None
        raise
    tmp_path = tmp_dir / path.name
    try:
        yield tmp_path
        if not tmp_path.exists():
            raise RuntimeError(f"nothing was written for {path}")
        _move_into_place(tmp_path, path, tmp_dir)
    except OSError as exc:
        ours = str(exc.filename or "").startswith((str(tmp_dir), str(path)))  # not, e.g., an input being read
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno in _OUTPUT_ERRNOS and ours):
            raise _output_error(path, exc) from None
        raise
    finally:  # runs on success, error and KeyboardInterrupt alike
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_package(mlmodel, path: str | os.PathLike) -> Path:
    """Save an MLModel to ``path`` (an ``.mlpackage`` path) atomically (no partial package on error or Ctrl-C)."""
    check_package_output(path)
    with atomic_output(path) as tmp:
        mlmodel.save(str(tmp))
    return Path(path)
