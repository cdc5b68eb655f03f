"""Plain-text tables for the terminal and Markdown, from rows of values."""
from __future__ import annotations

from typing import Any, Sequence


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], footer: Sequence[Sequence[Any]] = ()) -> str:
    """Aligned text table; numbers right-aligned, a rule under the header and above the footer."""
    cells = [[_cell(v) for v in row] for row in rows]
    foot = [[_cell(v) for v in row] for row in footer]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells + foot)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line([str(h) for h in headers]), rule, *(line(r) for r in cells)]
    if foot:
        out += [rule, *(line(r) for r in foot)]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """GitHub-flavoured Markdown table."""
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").replace("%", ""))
        return True
    except ValueError:
        return text == "-"


def compression_table(report) -> str:
    """Per-weight before/after/predicted bytes of a compression report."""
    rows = [[w.name, w.torch_name, w.spec, w.bytes_before, w.bytes_after, w.bytes_predicted,
             f"{100 * (w.bytes_after - w.bytes_predicted) / max(w.bytes_predicted, 1):+.2f}%", w.compression]
            for w in report.weights]
    footer = [["total", "", "", report.bytes_before, report.bytes_after, report.bytes_predicted,
               f"{100 * (report.bytes_after - report.bytes_predicted) / max(report.bytes_predicted, 1):+.2f}%",
               f"{human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} "
               f"({report.bytes_before / max(report.bytes_after, 1):.2f}x)"]]
    headers = ["weight", "torch name", "spec", "bytes before", "bytes after", "predicted", "after vs pred", "compression"]
    return format_table(headers, rows, footer)
