"""Evaluation and calibration data: one loader for folders, .npz files and iterables.

Calibration folder format (see calibration_data/README.md):
  ``format.json``  optional: {"input_shape": [C,H,W], "mode": "L"|"RGB", "divisor": 255,
                   "mean": [...], "std": [...]}; input = (pixel / divisor - mean) / std
  ``labels.csv``   optional: header ``file,label``; row order is sample order
  ``*.png`` etc.   images; without labels.csv every image, sorted by name, y = None

Run ``python -m coreml_opt.data --write-digits calibration_data/digits`` to
regenerate the shipped digits set (byte-identical on every run).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from coreml_opt.errors import DataError
from coreml_opt.nonfinite import nonfinite_count

logger = logging.getLogger(__name__)

FORMAT_FILE = "format.json"
LABELS_FILE = "labels.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Digits pixels are integers 0..16: stored as value*15 (0..240), read back as
# png/240.0, which float32 division recovers exactly as value/16.
DIGITS_DIVISOR = 240
DIGITS_PER_CLASS = 20

ArrayLike = Union[np.ndarray, torch.Tensor]


class Dataset:
    """Inputs ``x`` (float32, or int64 for integer inputs such as token ids) and optional labels ``y``
    (int64) with a stable content hash."""

    def __init__(self, x: ArrayLike, y: Optional[ArrayLike] = None, source: str = "data") -> None:
        x = torch.as_tensor(x)
        integer = not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
        self.x = x.to(torch.int64 if integer else torch.float32).contiguous()
        self.y = None if y is None else torch.as_tensor(y).to(torch.int64).contiguous()
        self.source = source
        if self.x.ndim == 0 or len(self.x) == 0:
            raise DataError(source, "holds no samples", "provide at least one input")
        if self.y is not None and (self.y.ndim != 1 or len(self.y) != len(self.x)):
            raise DataError(source, f"has {len(self.x)} inputs but labels of shape "
                            f"{list(self.y.shape)}", "give one integer label per input")
        bad = nonfinite_count(self.x)
        if bad:  # every output, metric and calibration statistic of them would be NaN or meaningless
            raise DataError(source, f"{bad} of its {self.x.numel()} input values are NaN or inf (in float32)",
                            "remove or fix those samples")
        self.content_hash = _hash_tensors(self.x, self.y)

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        labels = "no labels" if self.y is None else "labels"
        return (f"Dataset({self.source!r}, x={list(self.x.shape)}, {labels}, "
                f"hash={self.content_hash[:12]})")

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Yield (x, y) batches in order; y is None when the data has no labels."""
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size], None if self.y is None else self.y[i:i + batch_size]


def _hash_tensors(x: torch.Tensor, y: Optional[torch.Tensor]) -> str:
    """sha256 over dtype, shape and bytes of x and y: equal data gives equal hashes."""
    h = hashlib.sha256()
    for name, t in (("x", x), ("y", y)):
        if t is None:
            h.update(f"{name}:none;".encode())
            continue
        arr = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}:{arr.dtype.str}:{list(arr.shape)};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- readers

def _read_format(folder: Path) -> dict[str, Any]:
    path = folder / FORMAT_FILE
    if not path.is_file():
        return {}
    try:
        fmt = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(str(path), f"is not valid JSON ({exc})",
                        "fix the file or delete it to use the defaults") from exc
    if not isinstance(fmt, dict):
        raise DataError(str(path), "must hold a JSON object", 'e.g. {"divisor": 255}')
    mode = fmt.get("mode")
    if mode not in (None, "L", "RGB"):
        raise DataError(str(path), f"mode {mode!r} is not supported", 'use "L" or "RGB"')
    divisor = fmt.get("divisor", 255)
    if isinstance(divisor, bool) or not isinstance(divisor, (int, float)) or divisor <= 0:
        raise DataError(str(path), f"divisor {divisor!r} is not a positive number",
                        "use e.g. 255 for inputs in [0, 1]")
    return fmt


def _read_labels(folder: Path) -> Optional[list[tuple[str, int]]]:
    path = folder / LABELS_FILE
    if not path.is_file():
        return None
    rows: list[tuple[str, int]] = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
            raise DataError(str(path), "needs a header row with columns file,label",
                            "add the line 'file,label' at the top")
        for line, row in enumerate(reader, start=2):
            name, label = (row.get("file") or "").strip(), (row.get("label") or "").strip()
            try:
                rows.append((name, int(label)))
            except ValueError:
                raise DataError(f"{path}:{line}", f"label {label!r} is not an integer",
                                "write class indices 0..K-1") from None
    return rows


def _read_image(path: Path, mode: Optional[str]) -> np.ndarray:
    """Pixel array (C,H,W) uint8-valued float64 in the requested or detected mode."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img.load()
            if mode is None:
                mode = "L" if img.mode in ("L", "1", "I;16", "LA") else "RGB"
            arr = np.asarray(img.convert(mode))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(str(path), f"is not a readable image ({type(exc).__name__})",
                        "replace or delete the file") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_folder(folder: Union[str, Path]) -> Dataset:
    """Load a calibration folder (images + optional labels.csv and format.json)."""
    folder = Path(folder)
    fmt = _read_format(folder)
    rows = _read_labels(folder)
    if rows is None:
        files = sorted(p.name for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        labels: Optional[list[int]] = None
    else:
        files = [name for name, _ in rows]
        labels = [label for _, label in rows]
        listed = set(files)
        unlisted = [p.name for p in folder.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in listed]
        if unlisted:
            logger.warning("%s: %d image(s) not in %s are ignored (e.g. %s)",
                           folder, len(unlisted), LABELS_FILE, sorted(unlisted)[0])
    if not files:
        raise DataError(str(folder), "contains no images",
                        f"add image files ({', '.join(IMAGE_SUFFIXES)}) and a {LABELS_FILE}")
    for name in files:
        if not (folder / name).is_file():
            raise DataError(str(folder / LABELS_FILE), f"lists {name!r}, which does not exist",
                            "add the image or remove its row")
    arrays = [_read_image(folder / name, fmt.get("mode")) for name in files]
    shape = tuple(fmt["input_shape"]) if "input_shape" in fmt else arrays[0].shape
    for name, arr in zip(files, arrays):
        if arr.shape != shape:
            raise DataError(str(folder / name), f"has shape {list(arr.shape)}, expected {list(shape)}",
                            "resize all images to the same size")
    pixels = np.stack(arrays).astype(np.float32)
    x = pixels / np.float32(fmt.get("divisor", 255))
    if "mean" in fmt or "std" in fmt:
        channels = shape[0]
        mean = np.asarray(fmt.get("mean", [0.0] * channels), np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(fmt.get("std", [1.0] * channels), np.float32).reshape(1, -1, 1, 1)
        x = (x - mean) / std
    return Dataset(x, labels, source=str(folder))


def load_npz(path: Union[str, Path]) -> Dataset:
    """Load an .npz with array ``x`` (inputs, used as float32) and optional ``y`` (labels)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if "x" not in keys:
                raise DataError(str(path), f"has no array 'x' (found: {', '.join(sorted(keys)) or 'none'})",
                                "save inputs with np.savez(path, x=inputs, y=labels)")
            x, y = npz["x"], npz["y"] if "y" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(str(path), f"is not a readable .npz file ({exc})",
                        "write it with np.savez") from exc
    return Dataset(x, y, source=str(path))


def load_iterable(batches: Iterable[Any], source: str = "iterable") -> Dataset:
    """Concatenate batches that are ``x`` tensors or ``(x, y)`` pairs (e.g. a DataLoader)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            if len(batch) not in (1, 2):
                raise DataError(source, f"yields batches of {len(batch)} items",
                                "yield x or (x, y)")
            xs.append(torch.as_tensor(batch[0]))
            if len(batch) == 2 and batch[1] is not None:
                ys.append(torch.as_tensor(batch[1]).reshape(-1))
        else:
            xs.append(torch.as_tensor(batch))
    if not xs:
        raise DataError(source, "yielded no batches", "pass a non-empty DataLoader or iterable")
    if ys and len(ys) != len(xs):
        raise DataError(source, "has labels for only some batches", "yield (x, y) for every batch")
    return Dataset(torch.cat(xs), torch.cat(ys) if ys else None, source=source)


def load_dataset(source: Union[str, os.PathLike, Dataset, ArrayLike, Iterable[Any]]) -> Dataset:
    """Load a calibration folder, an .npz, a tensor/array, a torch Dataset or an iterable of batches."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DataError(str(path), "does not exist",
                            "pass a calibration folder or an .npz file")
        if path.is_dir():
            return load_folder(path)
        if path.suffix.lower() == ".npz":
            return load_npz(path)
        raise DataError(str(path), "is neither a folder nor an .npz file",
                        "pass a calibration folder or an .npz file")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return Dataset(source, None, source=type(source).__name__)
    if isinstance(source, torch.utils.data.Dataset) and not isinstance(
            source, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(source, batch_size=256, shuffle=False)
        return load_iterable(loader, source=type(source).__name__)
    if isinstance(source, Iterable):
        return load_iterable(source, source=type(source).__name__)
    raise DataError(repr(source)[:60], "is not a supported data source",
                    "pass a folder, an .npz path, a tensor or a DataLoader")


# --------------------------------------------------------------------------- writers

def _png_bytes(pixels: np.ndarray) -> bytes:
    """Deterministic PNG encoding of a (C,H,W) uint8 array (C = 1 or 3)."""
    from PIL import Image
    arr = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buf = io.BytesIO()
    # uint8 (H,W) -> mode L, (H,W,3) -> RGB; no timestamps or text chunks are written.
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=False,
                                                    compress_level=9)
    return buf.getvalue()


def write_calibration_folder(path: Union[str, Path], x: ArrayLike, y: Optional[ArrayLike] = None,
                             divisor: int = 255) -> Path:
    """Write inputs as PNGs (pixel = round(x * divisor)) plus labels.csv and format.json, atomically.

    Inputs must be (N,1,H,W) or (N,3,H,W) with x * divisor in 0..255; a value that
    does not survive the uint8 round trip raises DataError.
    """
    dest = Path(path)
    xa = np.asarray(torch.as_tensor(x, dtype=torch.float32))
    if xa.ndim != 4 or xa.shape[1] not in (1, 3) or len(xa) == 0:
        raise DataError("x", f"has shape {list(xa.shape)}",
                        "pass a non-empty (N,1,H,W) or (N,3,H,W) image batch")
    pixels_f = np.rint(xa.astype(np.float64) * divisor)
    if pixels_f.min() < 0 or pixels_f.max() > 255:
        raise DataError("x", f"times divisor {divisor} leaves the 0..255 pixel range",
                        "scale inputs to [0, 1] or choose a smaller divisor")
    pixels = pixels_f.astype(np.uint8)
    if not np.array_equal(pixels.astype(np.float32) / np.float32(divisor), xa):
        raise DataError("x", f"is not exactly representable as pixel/{divisor}",
                        "choose a divisor that makes every input an integer pixel value")
    labels = None if y is None else np.asarray(torch.as_tensor(y)).astype(np.int64).reshape(-1)
    if labels is not None and len(labels) != len(xa):
        raise DataError("y", f"has {len(labels)} labels for {len(xa)} inputs", "give one per input")
    width = max(4, len(str(len(xa) - 1)))
    names = [f"{i:0{width}d}.png" for i in range(len(xa))]
    fmt = {"input_shape": list(xa.shape[1:]), "mode": "L" if xa.shape[1] == 1 else "RGB",
           "divisor": divisor}
    from .model.package import atomic_output

    with atomic_output(dest) as staged:  # the old folder stays until the new one replaces it
        staged.mkdir()
        for name, px in zip(names, pixels):
            (staged / name).write_bytes(_png_bytes(px))
        (staged / FORMAT_FILE).write_text(json.dumps(fmt, indent=2) + "\n")
        if labels is not None:
            lines = ["file,label"] + [f"{n},{int(v)}" for n, v in zip(names, labels)]
            (staged / LABELS_FILE).write_text("\n".join(lines) + "\n")
    return dest


def digits_calibration_subset(per_class: int = DIGITS_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """First ``per_class`` samples of each class from the digits training split, class-interleaved."""
    from coreml_opt.zoo import digits_split
    x_tr, y_tr, _, _ = digits_split()
    picks = [np.flatnonzero(y_tr == c)[:per_class] for c in range(10)]
    order = np.stack(picks, axis=1).reshape(-1)  # 0,1,...,9,0,1,... so any prefix is balanced
    return x_tr[order], y_tr[order]


def write_digits_calibration(path: Union[str, Path], per_class: int = DIGITS_PER_CLASS) -> Path:
    """(Re)write the shipped digits calibration folder deterministically."""
    x, y = digits_calibration_subset(per_class)
    return write_calibration_folder(path, x, y, divisor=DIGITS_DIVISOR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m coreml_opt.data --write-digits DIR``: regenerate the digits calibration set."""
    parser = argparse.ArgumentParser(prog="python -m coreml_opt.data")
    parser.add_argument("--write-digits", metavar="DIR", required=True,
                        help="write the digits calibration folder here")
    parser.add_argument("--per-class", type=int, default=DIGITS_PER_CLASS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_digits_calibration(args.write_digits, args.per_class)
    logger.info("wrote %d samples to %s", 10 * args.per_class, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
