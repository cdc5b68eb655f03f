"""The sweep's heatmap.png: layers x candidates, colour = drop, drawn with Pillow alone.

Pillow and its bundled FreeType font draw it in tens of milliseconds; matplotlib's import alone
took longer than the rest of a sweep of the example model.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from .outputs import _atomic_write, _grid, drop_label, ranked_layers


def _cell_text(value: float, vmax: float) -> str:
    """Heatmap cell label: two decimals when the scale allows, else two significant digits (KL drops
    of 1e-4 would all read 0.00)."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if vmax >= 1 else f"{value:.2g}"


# matplotlib's "Reds": a linear ramp through the nine ColorBrewer colours.
_REDS = ((0xff, 0xf5, 0xf0), (0xfe, 0xe0, 0xd2), (0xfc, 0xbb, 0xa1), (0xfc, 0x92, 0x72), (0xfb, 0x6a, 0x4a),
         (0xef, 0x3b, 0x2c), (0xcb, 0x18, 0x1d), (0xa5, 0x0f, 0x15), (0x67, 0x00, 0x0d))
_NA_GREY = (0xdd, 0xdd, 0xdd)


def _reds(t: float) -> tuple[int, int, int]:
    """The Reds colour at ``t`` in [0, 1] (clamped; NaN counts as 0)."""
    t = 0.0 if math.isnan(t) else min(max(t, 0.0), 1.0)
    x = t * (len(_REDS) - 1)
    i = min(int(x), len(_REDS) - 2)
    f = x - i
    (r0, g0, b0), (r1, g1, b1) = _REDS[i], _REDS[i + 1]
    return round(r0 + (r1 - r0) * f), round(g0 + (g1 - g0) * f), round(b0 + (b1 - b0) * f)


def _colorbar_ticks(vmin: float, vmax: float) -> list[tuple[float, str]]:
    """About five round tick values in [vmin, vmax] with their labels."""
    span = vmax - vmin
    if not span > 1e-9:
        return [(vmin, "0" if vmin == 0 else f"{vmin:.3g}")]
    raw = span / 5
    exp = math.floor(math.log10(raw))
    step = next(m * 10.0 ** exp for m in (1, 2, 2.5, 5, 10) if m * 10.0 ** exp >= raw)
    decimals = max(0, -math.floor(math.log10(step) + 1e-12)) + (1 if round(step / 10.0 ** exp, 6) == 2.5 else 0)
    ticks = []
    for k in range(math.ceil(vmin / step - 1e-9), math.floor(vmax / step + 1e-9) + 1):
        value = k * step
        label = "0" if k == 0 else (f"{value:.{decimals}f}" if decimals <= 4 else f"{value:.2g}")
        ticks.append((value, label))
    return ticks


def _heatmap_values(result) -> tuple[list, list[list[float]]]:
    """Ranked layers and their drops per candidate in display units (NaN where no trial)."""
    layers = ranked_layers(result)
    grid = _grid(result)
    scale = 100.0 if result.unit == "fraction" else 1.0
    values = [[grid[(layer.layer, spec)].drop * scale if (layer.layer, spec) in grid else math.nan
               for spec in result.candidates] for layer in layers]
    return layers, values


def write_heatmap(result, path: Path) -> None:
    """Layers x candidates, colour = drop; each cell annotated, n/a cells grey.

    Drawn with Pillow alone (its bundled FreeType font), so no matplotlib import on the sweep's path.
    """
    from PIL import Image, ImageDraw, ImageFont

    layers, values = _heatmap_values(result)
    candidates = list(result.candidates)
    finite = [v for row in values for v in row if math.isfinite(v)]
    vmin = min(0.0, min(finite, default=0.0))
    vmax = max(max(finite, default=0.0), 1e-9)
    label = drop_label(result)
    title = f"{label} vs fp16 baseline"

    font = ImageFont.load_default(size=13)
    cell_font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=15)

    def width(text: str, f) -> int:
        return math.ceil(f.getlength(text))

    def height(f) -> int:
        return f.getbbox("Ag/(0")[3]

    texts = [["n/a" if math.isnan(v) else _cell_text(v, vmax) for v in row] for row in values]
    line_h = height(font)
    row_label_w = max((width(layer.layer, font) for layer in layers), default=0)
    col_label_w = max((width(spec, font) for spec in candidates), default=0)
    cell_text_w = max((width(t, cell_font) for row in texts for t in row), default=0)
    cell_w = max(72, col_label_w + 14, cell_text_w + 14)
    cell_h = max(28, height(cell_font) + 14)
    ticks = _colorbar_ticks(vmin, vmax)
    tick_w = max(width(t, font) for _, t in ticks)
    label_w, label_h = width(label, font), line_h
    title_w, title_h = width(title, title_font), height(title_font)

    pad, gap, bar_w = 12, 8, 18
    grid_x = pad + row_label_w + gap
    grid_y = pad + title_h + 2 * gap
    grid_w, grid_h = cell_w * len(candidates), cell_h * len(layers)
    bar_x = grid_x + grid_w + 3 * gap
    bar_h = max(grid_h, 5 * line_h)
    image_w = max(bar_x + bar_w + 5 + tick_w + 2 * gap + label_h + pad, grid_x + title_w + pad)
    image_h = max(grid_y + grid_h + gap + line_h + pad, grid_y + bar_h + pad, grid_y + label_w + 4 + pad)

    image = Image.new("RGB", (image_w, image_h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((grid_x + grid_w / 2 if grid_w >= title_w else grid_x + title_w / 2, pad), title,
              fill="black", font=title_font, anchor="mt")
    span = vmax - vmin
    for i, row in enumerate(values):
        y = grid_y + i * cell_h
        for j, v in enumerate(row):
            x = grid_x + j * cell_w
            level = (v - vmin) / span if math.isfinite(v) else math.nan
            draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=_NA_GREY if math.isnan(level) else _reds(level))
            # White on the dark end of the scale (v > 0.6 * vmax when vmin is 0, as matplotlib drew it).
            ink = "white" if level > 0.6 else "black"
            draw.text((x + cell_w / 2, y + cell_h / 2), texts[i][j], fill=ink, font=cell_font, anchor="mm")
        draw.text((grid_x - gap, y + cell_h / 2), layers[i].layer, fill="black", font=font, anchor="rm")
    for j, spec in enumerate(candidates):
        draw.text((grid_x + j * cell_w + cell_w / 2, grid_y + grid_h + gap), spec, fill="black", font=font,
                  anchor="mt")
    draw.rectangle((grid_x - 1, grid_y - 1, grid_x + grid_w, grid_y + grid_h), outline="black")

    # Colour bar: vmax at the top, vmin at the bottom, ticks and the drop label on its right.
    for k in range(bar_h):
        draw.line((bar_x, grid_y + k, bar_x + bar_w - 1, grid_y + k), fill=_reds(1 - k / max(bar_h - 1, 1)))
    draw.rectangle((bar_x - 1, grid_y - 1, bar_x + bar_w, grid_y + bar_h), outline="black")
    for value, text in ticks:
        y = grid_y + round((1 - (value - vmin) / span) * (bar_h - 1)) if span > 1e-9 else grid_y + bar_h - 1
        draw.line((bar_x + bar_w, y, bar_x + bar_w + 4, y), fill="black")
        draw.text((bar_x + bar_w + 7, y), text, fill="black", font=font, anchor="lm")
    sideways = Image.new("L", (label_w + 4, label_h + 8), 0)
    ImageDraw.Draw(sideways).text((2, 4 + label_h / 2), label, fill=255, font=font, anchor="lm")
    sideways = sideways.transpose(Image.Transpose.ROTATE_90)
    image.paste((0, 0, 0), (bar_x + bar_w + 7 + tick_w + gap, grid_y + max(0, (bar_h - sideways.height) // 2)),
                sideways)

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    _atomic_write(path, buffer.getvalue())
