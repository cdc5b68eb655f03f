"""Data loading: calibration folders, .npz, iterables, exact round trips, one-line errors."""
from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from coreml_opt import data
from coreml_opt.data import Dataset, load_dataset, write_calibration_folder
from coreml_opt.errors import DataError

REPO = Path(__file__).resolve().parents[1]
DIGITS_DIR = REPO / "calibration_data" / "digits"


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_shipped_digits_folder_equals_training_samples(digits_data):
    ds = load_dataset(DIGITS_DIR)
    x_tr, y_tr, x_te, _ = digits_data
    assert ds.x.shape == (200, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64 and np.bincount(ds.y.numpy()).tolist() == [20] * 10
    x_sub, y_sub = data.digits_calibration_subset()
    assert np.array_equal(ds.x.numpy(), x_sub) and np.array_equal(ds.y.numpy(), y_sub)
    # every sample is bit-identical to a training sample with the same label
    flat_tr = x_tr.reshape(len(x_tr), -1)
    for xi, yi in zip(ds.x.numpy().reshape(200, -1), ds.y.numpy()):
        hits = np.flatnonzero((flat_tr == xi).all(axis=1))
        assert hits.size and (y_tr[hits] == yi).any()


def test_regenerating_digits_folder_is_byte_identical(tmp_path):
    out = data.write_digits_calibration(tmp_path / "digits")
    names = sorted(p.name for p in DIGITS_DIR.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(DIGITS_DIR, out, names, shallow=False)
    assert mismatch == [] and errors == []


def test_cli_entry_writes_folder(tmp_path):
    assert data.main(["--write-digits", str(tmp_path / "d"), "--per-class", "2"]) == 0
    assert len(load_dataset(tmp_path / "d")) == 20


def test_rgb_folder_round_trip_and_atomic_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 3, 4, 6)).astype(np.float32) / 255
    y = np.array([3, 1, 4, 1, 5])
    dest = tmp_path / "rgb"
    write_calibration_folder(dest, x[:2], y[:2])
    write_calibration_folder(dest, x, y)  # replaces the previous folder
    ds = load_dataset(dest)
    assert torch.equal(ds.x, torch.from_numpy(x)) and ds.y.tolist() == y.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["rgb"]  # no temp dirs left


def test_folder_without_labels_uses_sorted_images(tmp_path):
    x = np.arange(3 * 4, dtype=np.float32).reshape(3, 1, 2, 2) / 255
    write_calibration_folder(tmp_path / "f", x)
    assert not (tmp_path / "f" / "labels.csv").exists()
    ds = load_dataset(tmp_path / "f")
    assert ds.y is None and torch.equal(ds.x, torch.from_numpy(x))


def test_write_refuses_inexact_values(tmp_path):
    with pytest.raises(DataError, match="not exactly representable"):
        write_calibration_folder(tmp_path / "f", np.full((1, 1, 2, 2), 0.3, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_npz_with_and_without_labels(tmp_path, digits_data):
    x_tr, y_tr, _, _ = digits_data
    np.savez(tmp_path / "a.npz", x=x_tr[:10], y=y_tr[:10])
    np.savez(tmp_path / "b.npz", x=x_tr[:10])
    a, b = load_dataset(tmp_path / "a.npz"), load_dataset(str(tmp_path / "b.npz"))
    assert torch.equal(a.x, torch.from_numpy(x_tr[:10])) and a.y.tolist() == y_tr[:10].tolist()
    assert b.y is None and torch.equal(b.x, a.x)


def test_dataloader_and_iterables(digits_data):
    x_tr, y_tr, _, _ = digits_data
    tds = torch.utils.data.TensorDataset(torch.from_numpy(x_tr[:50]), torch.from_numpy(y_tr[:50]))
    loader = torch.utils.data.DataLoader(tds, batch_size=16)
    from_loader = load_dataset(loader)
    from_dataset = load_dataset(tds)
    from_list = load_dataset([torch.from_numpy(x_tr[:20]), torch.from_numpy(x_tr[20:50])])
    from_array = load_dataset(x_tr[:50])
    for ds in (from_loader, from_dataset):
        assert torch.equal(ds.x, torch.from_numpy(x_tr[:50])) and ds.y.tolist() == y_tr[:50].tolist()
    assert from_list.y is None and from_list.content_hash == from_array.content_hash
    assert load_dataset(from_loader) is from_loader


def test_content_hash_is_stable_and_content_sensitive(digits_data):
    x_tr, y_tr, _, _ = digits_data
    h1 = Dataset(x_tr[:30], y_tr[:30]).content_hash
    assert h1 == Dataset(torch.from_numpy(x_tr[:30].copy()), y_tr[:30].astype(np.int32)).content_hash
    assert len(h1) == 64 and int(h1, 16) >= 0
    changed = x_tr[:30].copy()
    changed[0, 0, 0, 0] += 1
    assert Dataset(changed, y_tr[:30]).content_hash != h1
    assert Dataset(x_tr[:30]).content_hash != h1  # labels count
    assert load_dataset(DIGITS_DIR).content_hash == load_dataset(DIGITS_DIR).content_hash


# ----------------------------------------------------------------------------- errors

def test_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as exc:
        load_dataset(tmp_path / "nope")
    assert "nope" in _one_line(exc)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="contains no images") as exc:
        load_dataset(tmp_path)
    _one_line(exc)


def test_corrupt_image_names_the_file(tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(DIGITS_DIR, folder)
    (folder / "0007.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="not a readable image") as exc:
        load_dataset(folder)
    assert "0007.png" in _one_line(exc)


def test_truncated_image_names_the_file(tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(DIGITS_DIR, folder)
    png = (folder / "0003.png").read_bytes()
    (folder / "0003.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(DataError) as exc:
        load_dataset(folder)
    assert "0003.png" in _one_line(exc)


def test_labels_listing_a_missing_file(tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(DIGITS_DIR, folder)
    (folder / "0042.png").unlink()
    with pytest.raises(DataError, match="lists '0042.png', which does not exist") as exc:
        load_dataset(folder)
    _one_line(exc)


def test_bad_labels_csv(tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(DIGITS_DIR, folder)
    (folder / "labels.csv").write_text("name,class\n0000.png,0\n")
    with pytest.raises(DataError, match="file,label"):
        load_dataset(folder)
    (folder / "labels.csv").write_text("file,label\n0000.png,zero\n")
    with pytest.raises(DataError, match="not an integer") as exc:
        load_dataset(folder)
    assert "labels.csv:2" in _one_line(exc)


def test_mismatched_image_size_names_the_file(tmp_path):
    folder = tmp_path / "f"
    write_calibration_folder(folder, np.zeros((2, 1, 4, 4), np.float32))
    from PIL import Image
    Image.new("L", (5, 4)).save(folder / "0001.png")
    with pytest.raises(DataError, match="has shape") as exc:
        load_dataset(folder)
    assert "0001.png" in _one_line(exc)


def test_npz_without_x(tmp_path):
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((2, 3)))
    with pytest.raises(DataError, match="has no array 'x' \\(found: inputs\\)") as exc:
        load_dataset(tmp_path / "bad.npz")
    _one_line(exc)


def test_corrupt_npz_and_unsupported_sources(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(tmp_path / "c.npz")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="neither a folder nor an .npz"):
        load_dataset(tmp_path / "d.txt")
    with pytest.raises(DataError, match="yielded no batches"):
        load_dataset(iter([]))
    with pytest.raises(DataError, match="not a supported data source"):
        load_dataset(42)
    with pytest.raises(DataError, match="labels of shape"):
        Dataset(np.zeros((3, 2), np.float32), np.zeros(2))
