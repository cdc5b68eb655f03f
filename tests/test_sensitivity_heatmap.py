"""heatmap.png drawn with Pillow: layout, Reds colours, n/a cells, edge cases, no matplotlib import."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from coreml_opt.sensitivity.heatmap import _colorbar_ticks, _reds, write_heatmap
from coreml_opt.sensitivity.layers import Layer
from coreml_opt.sensitivity.sweep import SweepResult, Trial

LIGHTEST, DARKEST, NA_GREY = (0xFF, 0xF5, 0xF0), (0x67, 0x00, 0x0D), (0xDD, 0xDD, 0xDD)
SPECS = ["int8", "int4/block32", "pal6", "pal4", "pal2", "prune50", "int4/block16", "pal3"]


def make_result(drops: list[list[float | None]], names: list[str] | None = None,
                specs: list[str] | None = None, unit: str = "fraction", metric: str = "top1") -> SweepResult:
    """A sweep result with drops[i][j] for layer i x candidate j; None = no trial (n/a)."""
    specs = specs or SPECS[:len(drops[0]) if drops else 0]
    names = names or [f"features.{3 * i}.weight" for i in range(len(drops))]
    layers = [Layer(n, n.replace(".", "_"), "conv", (8, 8, 3, 3), 576, 1152) for n in names]
    trials = [Trial(n, n.replace(".", "_"), "conv", s, 576, 300, 1152, 0.9 - d, 0.9, d, 0.01)
              for n, row in zip(names, drops) for s, d in zip(specs, row) if d is not None]
    return SweepResult(trials, 0.9, 0.9, layers, [], [], metric, True, unit, specs, "iOS18")


def render(tmp_path: Path, result: SweepResult, name: str = "heatmap.png") -> Image.Image:
    path = tmp_path / name
    write_heatmap(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(path)
    assert image.format == "PNG"
    return image.convert("RGB")


def grid_box(image: Image.Image) -> tuple[int, int, int, int]:
    """Inside of the cell grid's black frame: the longest run of pure black pixels on one row is its top."""
    width, height = image.size
    px = image.load()
    best = (0, 0, 0)  # run length, y, x start
    for y in range(height):
        run = 0
        for x in range(width):
            run = run + 1 if px[x, y] == (0, 0, 0) else 0
            if run > best[0]:
                best = (run, y, x - run + 1)
    length, top, left = best
    right = left + length - 1
    bottom = top + 1
    while px[left + 1, bottom] != (0, 0, 0):  # down the first cell column (no text there) to the bottom edge
        bottom += 1
    return left + 1, top + 1, right, bottom  # inner box, right/bottom exclusive


def cell_colour(image: Image.Image, rows: int, cols: int, i: int, j: int) -> tuple[int, int, int]:
    """Fill colour of cell (i, j): the most common pixel in it (the annotation is a minority)."""
    left, top, right, bottom = grid_box(image)
    w, h = (right - left) / cols, (bottom - top) / rows
    box = (round(left + j * w), round(top + i * h), round(left + (j + 1) * w), round(top + (i + 1) * h))
    return Counter(image.crop(box).getdata()).most_common(1)[0][0]


def cell_pixels(image: Image.Image, rows: int, cols: int, i: int, j: int) -> set:
    left, top, right, bottom = grid_box(image)
    w, h = (right - left) / cols, (bottom - top) / rows
    return set(image.crop((round(left + j * w), round(top + i * h), round(left + (j + 1) * w),
                           round(top + (i + 1) * h))).getdata())


def assert_white_border(image: Image.Image, margin: int = 4) -> None:
    """Nothing drawn at the edges: no label or bar clipped by the image size."""
    width, height = image.size
    px = image.load()
    for x in range(width):
        for y in [*range(margin), *range(height - margin, height)]:
            assert px[x, y] == (255, 255, 255), (x, y)
    for y in range(height):
        for x in [*range(margin), *range(width - margin, width)]:
            assert px[x, y] == (255, 255, 255), (x, y)


def darkness(rgb: tuple[int, int, int]) -> int:
    return -sum(rgb)


def test_reds_matches_matplotlib_anchors():
    assert _reds(0.0) == LIGHTEST and _reds(1.0) == DARKEST
    assert _reds(0.5) == (0xFB, 0x6A, 0x4A)  # the middle ColorBrewer colour
    assert _reds(-3.0) == LIGHTEST and _reds(7.0) == DARKEST and _reds(math.nan) == LIGHTEST
    ramp = [_reds(k / 50) for k in range(51)]
    assert all(darkness(a) <= darkness(b) for a, b in itertools.pairwise(ramp))


def test_colorbar_ticks():
    assert [label for _, label in _colorbar_ticks(0.0, 7.15)] == ["0", "2", "4", "6"]
    assert [label for _, label in _colorbar_ticks(-0.1, 0.84)] == ["0", "0.2", "0.4", "0.6", "0.8"]
    assert _colorbar_ticks(0.0, 1e-9) == [(0.0, "0")]
    for vmin, vmax in ((-0.1, 0.84), (0.0, 1e-4), (-3.0, 1e-9), (0.0, 250.0), (-2e-5, 1e-4)):
        ticks = _colorbar_ticks(vmin, vmax)
        assert 2 <= len(ticks) <= 8
        assert all(vmin - 1e-12 <= v <= vmax + 1e-12 for v, _ in ticks)
        assert len({label for _, label in ticks}) == len(ticks)  # distinct, readable labels


def test_png_layout_colours_and_na(tmp_path):
    # Ranked most sensitive first: layer "b" (worst 0.08) is row 0, "a" (0.04) row 1, "c" (0.01) row 2.
    drops = [[0.0, 0.02, None, 0.04],
             [0.01, 0.03, 0.05, 0.08],
             [0.0, math.nan, 0.01, 0.005]]
    result = make_result(drops, names=["a", "b", "c"])
    image = render(tmp_path, result)
    assert_white_border(image)
    left, top, right, bottom = grid_box(image)
    assert (right - left) / 4 >= 70 and (bottom - top) / 3 >= 28  # readable cells
    assert cell_colour(image, 3, 4, 0, 3) == DARKEST  # b x pal4: the largest drop
    assert cell_pixels(image, 3, 4, 0, 3) >= {(255, 255, 255)}  # white annotation on the dark cell
    assert cell_colour(image, 3, 4, 1, 0) == LIGHTEST  # a x int8: zero drop, vmin = 0
    assert cell_colour(image, 3, 4, 1, 2) == NA_GREY  # a x pal6: no trial
    assert cell_colour(image, 3, 4, 2, 1) == NA_GREY  # c x int4/block32: NaN drop
    row_b = [cell_colour(image, 3, 4, 0, j) for j in range(4)]
    assert darkness(row_b[0]) < darkness(row_b[1]) < darkness(row_b[2]) < darkness(row_b[3])
    assert (0, 0, 0) in cell_pixels(image, 3, 4, 1, 0)  # black annotation on the light cell


def test_size_grows_with_layers_candidates_and_names(tmp_path):
    base = render(tmp_path, make_result([[0.01] * 3] * 2), "base.png")
    more_layers = render(tmp_path, make_result([[0.01] * 3] * 6), "layers.png")
    more_specs = render(tmp_path, make_result([[0.01] * 7] * 2), "specs.png")
    long_name = "model.encoder.layers.11.self_attention.in_proj_weight"
    long_names = render(tmp_path, make_result([[0.01] * 3] * 2, names=[long_name, "x"]), "names.png")
    long_spec = render(tmp_path, make_result([[0.01] * 3] * 2, specs=["int8", "int4/block32+prune50+pal4", "pal2"]),
                       "spec.png")
    assert more_layers.height > base.height and more_layers.width >= base.width
    assert more_specs.width > base.width
    assert long_names.width > base.width + 150
    assert long_spec.width > base.width
    for image in (base, more_layers, more_specs, long_names, long_spec):
        assert_white_border(image)
    left, _, right, _ = grid_box(long_spec)
    assert (right - left) / 3 >= 70


@pytest.mark.parametrize("drops, unit", [
    ([[0.03]], "fraction"),  # one layer, one candidate
    ([[0.01], [0.02], [0.0]], "fraction"),  # one candidate
    ([[0.01, 0.02, 0.0, 0.05]], "fraction"),  # one layer
    ([[0.0, 0.0], [0.0, 0.0]], "fraction"),  # vmax ~ 0
    ([[-0.01, -0.002], [-0.03, None]], "fraction"),  # every drop negative (compression helped)
    ([[math.nan, None], [None, math.nan]], "fraction"),  # nothing measured
    ([[1e-4, 3e-5], [-2e-5, 0.0]], "nats"),  # tiny KL drops
    ([[250.0, math.inf], [0.5, 3.0]], "dB"),
])
def test_edge_cases_render(tmp_path, drops, unit):
    image = render(tmp_path, make_result(drops, unit=unit))
    assert_white_border(image)
    rows, cols = len(drops), len(drops[0])
    left, top, right, bottom = grid_box(image)
    assert (right - left) / cols >= 70 and (bottom - top) / rows >= 28
    finite = [d for row in drops for d in row if d is not None and math.isfinite(d)]
    for i, row in enumerate(sorted(drops, key=lambda r: -max((d for d in r if d is not None and not math.isnan(d)),
                                                             default=-math.inf))):
        for j, d in enumerate(row):
            colour = cell_colour(image, rows, cols, i, j)
            if d is None or not math.isfinite(d):
                assert colour == NA_GREY
            elif d == min(finite) and (d < 0 or max(finite) == 0):
                assert colour == LIGHTEST  # the most negative drop, or all zero: the light end


def test_negative_drops_are_lightest(tmp_path):
    image = render(tmp_path, make_result([[-0.02, 0.0, 0.05]]))
    assert cell_colour(image, 1, 3, 0, 0) == LIGHTEST
    assert cell_colour(image, 1, 3, 0, 2) == DARKEST
    assert darkness(cell_colour(image, 1, 3, 0, 1)) < darkness(_reds(0.5))


def test_no_matplotlib_import(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from types import SimpleNamespace as NS
        from coreml_opt.sensitivity.heatmap import write_heatmap
        before = {{m for m in sys.modules if m.split(".")[0] == "matplotlib"}}
        layers = [NS(layer=f"l{{i}}") for i in range(3)]
        specs = ["int8", "int4/block32", "pal4"]
        trials = [NS(layer=f"l{{i}}", spec=s, drop=0.01 * i * j) for i in range(3) for j, s in enumerate(specs)]
        result = NS(layers=layers, trials=trials, candidates=specs, unit="fraction", metric="top1")
        write_heatmap(result, Path({str(tmp_path / "h.png")!r}))
        after = {{m for m in sys.modules if m.split(".")[0] == "matplotlib"}}
        print(sorted(after - before))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert Image.open(tmp_path / "h.png").size[0] > 0
