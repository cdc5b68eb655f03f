"""Real unlabeled photos for ImageNet models, offline: the photos scikit-learn and scikit-image install.

Eighteen source photos (scikit-learn's ``load_sample_images`` and scikit-image's ``data`` module) give
seeded random-resized crops with horizontal flips (torchvision's ``RandomResizedCrop`` recipe: area
8–100 % — here 10–100 % — aspect 3/4–4/3), resized with Pillow's bilinear filter. Crop ``i`` depends only
on ``seed`` and ``i``, so the first 128 of 256 are the same as the 128 of a 128-image call. The plan
half holds the even crops and the report half the odd ones: both see every source photo, never the
same crop. Needs scikit-image (in the ``test`` extra); DataError names it when absent.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from .data import Dataset
from .errors import DataError

# skimage.data photos bundled with the wheel (the ones fetched with pooch on first use are left out).
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
    "immunohistochemistry", "retina", "camera", "coins", "moon", "brick", "grass", "gravel", "cell", "page")
SKLEARN_PHOTOS: tuple[str, ...] = ("china.jpg", "flower.jpg")
# EfficientNet-Lite's preprocessing (TF reference: MEAN_RGB 127, STDDEV_RGB 128), on 0-255 values.
LITE_MEAN, LITE_STD = 127.0, 128.0


@functools.lru_cache(maxsize=1)
def source_photos() -> tuple[np.ndarray, ...]:
    """The source photos as uint8 (H, W, 3) arrays, grayscale ones repeated to RGB."""
    try:
        import skimage.data as skdata
    except ImportError as exc:
        raise DataError("photos", f"need scikit-image ({exc})", 'pip install -e ".[test]"') from None
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    for name in SKIMAGE_PHOTOS:
        image = getattr(skdata, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo pair: the left view
        photos.append(_rgb(np.asarray(image)))
    return tuple(photos)


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.1, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """One crop of ``image`` (uint8 H×W×3) resized to ``size``×``size`` (uint8), torchvision's recipe
    (10 tries, then the centre crop)."""
    from PIL import Image

    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            break
    else:
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    crop = Image.fromarray(image[top:top + h, left:left + w]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop)
    return out[:, ::-1] if rng.random() < 0.5 else out


def crop_sources(n: int) -> list[int]:
    """The source photo of each of ``n`` crops: crops ``2k`` and ``2k + 1`` share photo ``k % 18``."""
    return [(i // 2) % len(SKLEARN_PHOTOS + SKIMAGE_PHOTOS) for i in range(n)]


def photo_crops(n: int = 256, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` uint8 crops (n, size, size, 3); crops ``2k`` and ``2k + 1`` are of source photo ``k % 18``, so the
    even and the odd crops (the two halves) both cover every photo."""
    sources = source_photos()
    crops = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, source in enumerate(crop_sources(n)):
        rng = np.random.default_rng([seed, i])
        crops[i] = random_resized_crop(sources[source], rng, size)
    return crops


def to_tensor(crops: np.ndarray, mean: float | Sequence[float] = LITE_MEAN,
              std: float | Sequence[float] = LITE_STD) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W), ``(x - mean) / std`` on 0–255 values."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).to(torch.float32)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def photo_halves(n: int = 256, size: int = 224, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The plan half (even crops) and the report half (odd crops) of ``n`` photos, EfficientNet-Lite
    normalised, unlabeled."""
    x = to_tensor(photo_crops(n, size, seed))
    return (Dataset(x[0::2], source=f"photos plan half ({(n + 1) // 2} of {n} crops, seed {seed})"),
            Dataset(x[1::2], source=f"photos report half ({n // 2} of {n} crops, seed {seed})"))
