"""`coreml-opt report DIR`: one self-contained HTML page (plots as PNG data URIs) plus report.md beside it.

``write_report(DIR, "report.html")`` collects the run folder (see collect.py), renders both pages
from the same figures (summary.py) and writes each file atomically.
"""
from __future__ import annotations

import base64
import html
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .collect import RunReport, collect
from .summary import headline, section_titles, inventory_rows, result_rows, sensitivity_lines, stage_rows, target_lines

logger = logging.getLogger(__name__)

CSS = """
:root{--fg:#1d2430;--muted:#5b6577;--line:#dfe3ea;--bg:#f6f7f9;--card:#fff;--accent:#0b63ce;
--good:#1a7f37;--warn:#9a6700;--error:#cf222e;--info:#57606a}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--fg);
background:var(--bg)}
header{background:#14213d;color:#fff;padding:22px 32px 14px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600}
header .sub{color:#c9d3e6;font-size:13px}
nav{display:flex;flex-wrap:wrap;gap:4px 16px;margin-top:12px;font-size:13px}
nav a{color:#9cc4ff;text-decoration:none}
main{max-width:1180px;margin:0 auto;padding:18px 32px 40px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:12px;margin:4px 0 8px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px}
.card .t{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.card .v{font-size:21px;font-weight:600;margin:2px 0;word-break:break-word}
.card .d{font-size:12.5px;color:var(--muted)}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:4px 20px 16px;margin:16px 0}
h2{font-size:18px;margin:14px 0 10px}
h2 a{color:inherit;text-decoration:none}
table{border-collapse:collapse;width:100%;font-size:13px;margin:8px 0;display:block;overflow-x:auto}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
th{background:#eef1f5;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tfoot td{font-weight:600;border-top:2px solid var(--line)}
img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#fff}
figure{margin:10px 0}
figcaption{font-size:12.5px;color:var(--muted)}
pre{background:#f3f4f6;border:1px solid var(--line);border-radius:6px;padding:10px;font-size:12.5px;overflow:auto}
code{font-size:12.5px;background:#f0f2f5;padding:0 3px;border-radius:3px}
.missing{color:var(--muted);font-style:italic}
ul.advice{list-style:none;padding:0}
ul.advice li{border-left:4px solid var(--info);padding:6px 10px;margin:6px 0;background:#fafbfc}
ul.advice li.good{border-color:var(--good)}ul.advice li.warn{border-color:var(--warn)}
ul.advice li.error{border-color:var(--error)}
.badge{display:inline-block;font-size:11px;font-weight:600;text-transform:uppercase;padding:1px 6px;
border-radius:10px;color:#fff;background:var(--info);margin-right:6px}
.badge.good{background:var(--good)}.badge.warn{background:var(--warn)}.badge.error{background:var(--error)}
.layers{font-size:12.5px;color:var(--muted)}
"""


@dataclass
class ReportFiles:
    """What ``write_report`` wrote and what it found missing."""

    html: Path
    markdown: Path | None
    images: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    report: RunReport | None = None


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _numeric(text: str) -> bool:
    t = text.replace(",", "").replace("%", "").replace("x", "").replace("pt", "").strip().split(" ")[0]
    try:
        float(t)
        return True
    except ValueError:
        return False


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], footer: Sequence[Any] | None = None) -> str:
    """An HTML table; numeric cells right-aligned."""
    def cells(row, tag="td"):
        return "".join(f'<{tag}{" class=n" if tag == "td" and _numeric(str(v)) else ""}>{_e(v)}</{tag}>' for v in row)

    out = [f"<table><thead><tr>{cells(headers, 'th')}</tr></thead><tbody>"]
    out += [f"<tr>{cells(r)}</tr>" for r in rows]
    out.append("</tbody>" + (f"<tfoot><tr>{cells(footer)}</tr></tfoot>" if footer else "") + "</table>")
    return "".join(out)


def image(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _inline_code(text: str) -> str:
    """Escape, then turn `x` into <code>x</code>."""
    parts = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _sections(report: RunReport) -> dict[str, str]:
    found, out = report.folder, {}
    out["results"] = table(*result_rows(report)) if report.results else _missing(
        "Nothing to compare: no sweep, plan or package with sizes or accuracy was found.")
    if report.original is not None:
        headers, rows, footer = inventory_rows(report)
        note = ("fp16 sizes are those Core ML stores for the same shapes (no uncompressed package found). "
                if report.original_derived else "")
        other = report.original.inventory.other_bytes
        out["inventory"] = (f"<p>{_e(note)}Bits per weight = stored bytes × 8 / parameters, headers and scales "
                            f"included. Biases and other small constants ({other:,} bytes) are not listed.</p>"
                            + table(headers, rows, footer)
                            + (image(report.layers_png, "bits per weight per layer") if report.layers_png else ""))
    else:
        out["inventory"] = _missing("No .mlpackage found: no inventory.")
    if report.sweep:
        body = "".join(f"<p>{_inline_code(line)}</p>" for line in sensitivity_lines(report))
        body += (image(report.heatmap_png, "sensitivity heatmap", f"{report.metric} drop with one layer compressed at a time "
                       "(darker = more sensitive)") if report.heatmap_png else _missing("heatmap.png not found"))
        out["sensitivity"] = body
    else:
        out["sensitivity"] = _missing("No sensitivity sweep found (a folder with sweep.json and trials.json).")
    out["pareto"] = ((image(report.front_png, "Pareto front", report.front_note) if report.front_png
                      else _missing(report.front_note)))
    if report.plan is not None:
        budget = (report.plan_result or {}).get("budget")
        out["plan"] = (f"<p>From <code>{_e(found.relative(report.plan_path))}</code>"
                       + (f", budget {_e(budget)}" if budget else "") + ".</p>"
                       + f"<pre>{_e(report.plan.to_yaml())}</pre>")
    else:
        out["plan"] = _missing("No plan found (YAML from `coreml-opt plan -o`, or its --json output saved to a file).")
    if report.stages:
        out["workflow"] = table(*stage_rows(report))
    else:
        out["workflow"] = _missing("No workflow report.json found.")
    out["deployment"] = _deployment(report)
    out["inputs"] = _inputs(report)
    return out


def _deployment(report: RunReport) -> str:
    from .guidance import target_rows

    parts = ["<ul>" + "".join(f"<li>{_e(line)}</li>" for line in target_lines(report)) + "</ul>"]
    rows = target_rows(report.used)
    if rows:
        parts.append(table(["spec", "needs", "layers"], [[s, f"iOS{t} / macOS{t - 3}", ", ".join(layers)]
                                                         for s, t, layers in rows]))
    if report.advice:
        items = "".join(f'<li class="{_e(a.level)}"><span class="badge {_e(a.level)}">{_e(a.level)}</span>'
                        f"<b>{_e(a.topic)}</b>: {_inline_code(a.text)}"
                        + (f'<div class="layers">{_e(", ".join(a.layers))}</div>' if a.layers else "") + "</li>"
                        for a in report.advice)
        parts.append(f'<ul class="advice">{items}</ul>')
    else:
        parts.append(_missing("No plan or package found: no guidance."))
    return "".join(parts)


def _inputs(report: RunReport) -> str:
    found = report.folder
    described = found.describe()
    body = table(["found", "path"], described) if described else _missing("Nothing recognised in the folder.")
    missing = found.missing()
    if missing:
        body += "<p><b>Not found:</b></p><ul>" + "".join(f"<li>{_e(m)}</li>" for m in missing) + "</ul>"
    if report.notes:
        body += "<p><b>Notes:</b></p><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>"
    return body


def render_html(report: RunReport) -> str:
    """The whole page as one string (no external resources, no scripts)."""
    sections = _sections(report)
    cards = "".join(f'<div class="card"><div class="t">{_e(t)}</div><div class="v">{_e(v)}</div>'
                    f'<div class="d">{_e(d)}</div></div>' for t, v, d in headline(report))
    titles = section_titles(report)
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in titles)
    body = "".join(f'<section id="{sid}"><h2><a href="#{sid}">{_e(title)}</a></h2>{sections[sid]}</section>'
                   for sid, title in titles if sid != "summary")
    name = report.folder.root.resolve().name
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>coreml-opt report: {_e(name)}</title><style>{CSS}</style></head><body>"
            f'<header><h1>coreml-opt report: {_e(name)}</h1>'
            f'<div class="sub">{_e(report.folder.root)} · metric {_e(report.metric)} · target '
            f"{_e(report.target or '-')}</div><nav>{nav}</nav></header><main>"
            f'<section id="summary"><h2><a href="#summary">Summary</a></h2><div class="cards">{cards}</div></section>'
            f"{body}</main></body></html>\n")


def write_report(root: str | os.PathLike, output: str | os.PathLike = "report.html", *,
                 markdown: str | os.PathLike | None = "", measure: bool = True) -> ReportFiles:
    """Collect ``root`` and write the HTML page and (unless ``markdown`` is None) report.md beside it, atomically.

    ``markdown=""`` means ``<output stem>.md`` next to the HTML; the Markdown's plots go beside it as PNG files."""
    from ..model.package import atomic_output
    from .markdown import render_markdown

    report = collect(root, measure=measure)
    output = Path(output)
    with atomic_output(output) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")
    files = ReportFiles(output, None, missing=report.folder.missing(), report=report)
    if markdown is not None:
        md_path = Path(markdown) if markdown else output.with_suffix(".md")
        text, images = render_markdown(report, md_path.stem)
        for name, png in images.items():
            with atomic_output(md_path.parent / name) as tmp:
                tmp.write_bytes(png)
            files.images.append(md_path.parent / name)
        with atomic_output(md_path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        files.markdown = md_path
    logger.info("wrote %s%s", output, f" and {files.markdown}" if files.markdown else "")
    return files
