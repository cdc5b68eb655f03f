"""The offline real-photo set: seeded, stable prefixes, disjoint halves, and a pretrained model sees photos."""
import numpy as np
import pytest

pytest.importorskip("skimage", reason="scikit-image (test extra) is absent")

from coreml_opt import photos  # noqa: E402


def test_crops_are_seeded_and_a_prefix_of_a_longer_call():
    a, b = photos.photo_crops(20, size=32), photos.photo_crops(40, size=32)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b[:20])
    assert not np.array_equal(a, photos.photo_crops(20, size=32, seed=1))
    assert len({c.tobytes() for c in b}) == 40  # no two crops alike


def test_halves_are_disjoint_and_normalised():
    plan, report = photos.photo_halves(16, size=32)
    assert len(plan) == len(report) == 8 and plan.y is None
    assert plan.x.shape == (8, 3, 32, 32)
    assert not any(np.array_equal(p, r) for p in plan.x.numpy() for r in report.x.numpy())
    assert -1.0 <= float(plan.x.min()) and float(plan.x.max()) <= 1.0


def test_pretrained_efficientnet_lite0_recognises_the_cat():
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch (test extra) is absent")
    import torch
    from PIL import Image

    from coreml_opt import zoo

    cat = photos.source_photos()[2 + photos.SKIMAGE_PHOTOS.index("chelsea")]
    x = photos.to_tensor(np.asarray(Image.fromarray(cat).resize((224, 224), Image.BILINEAR))[None])
    with torch.no_grad():
        top = int(zoo.efficientnet_lite0()(x).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cats


def test_both_halves_see_every_source_photo():
    """Plan and report halves must hold crops of the same scenes: a split by photo would make the report half a
    different distribution, and overfitting to the plan half would look worse than it is."""
    n = 2 * len(photos.source_photos())
    sources = photos.crop_sources(n)
    assert set(sources[0::2]) == set(sources[1::2]) == set(range(len(photos.source_photos())))
