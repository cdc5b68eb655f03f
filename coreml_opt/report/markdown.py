"""report.md: the same sections and figures as the HTML page, with its plots as PNG files beside it."""
from __future__ import annotations

from .guidance import target_rows
from .summary import headline, section_titles, inventory_rows, result_rows, sensitivity_lines, stage_rows, target_lines
from .tables import markdown_table


def render_markdown(report, stem: str = "report") -> tuple[str, dict[str, bytes]]:
    """(Markdown text, {png file name: bytes}) for ``report``; image links are relative to the .md file."""
    images: dict[str, bytes] = {}

    def image(png: bytes | None, key: str, alt: str) -> list[str]:
        if not png:
            return []
        name = f"{stem}-{key}.png"
        images[name] = png
        return [f"![{alt}]({name})", ""]

    found = report.folder
    out = [f"# coreml-opt report: {found.root.resolve().name}", "",
           " · ".join(f"[{title}](#{sid})" for sid, title in section_titles(report)), "", "## Summary", ""]
    out += [f"- **{t}**: {v} ({d})" for t, v, d in headline(report)] + [""]

    out += ["## Before and after", ""]
    out += [markdown_table(*result_rows(report)), ""] if report.results else ["_No sizes or accuracy found._", ""]

    out += ["## Model inventory", ""]
    if report.original is not None:
        headers, rows, footer = inventory_rows(report)
        out += [markdown_table(headers, [*rows, footer]), ""]
        out += image(report.layers_png, "layers", "bits per weight per layer")
    else:
        out += ["_No .mlpackage found._", ""]

    out += ["## Sensitivity", ""]
    if report.sweep:
        out += [*sensitivity_lines(report), ""] + (image(report.heatmap_png, "heatmap", "sensitivity heatmap")
                                                   or ["_heatmap.png not found._", ""])
    else:
        out += ["_No sensitivity sweep found._", ""]

    out += [f"## Size vs {report.metric}", ""]
    out += image(report.front_png, "pareto", "Pareto front") + [f"_{report.front_note}_", ""]

    out += ["## Plan", ""]
    if report.plan is not None:
        out += [f"From `{found.relative(report.plan_path)}`:", "", "```yaml", report.plan.to_yaml().rstrip(), "```", ""]
    else:
        out += ["_No plan found._", ""]

    out += ["## Workflow stages", ""]
    if report.stages:
        out += [markdown_table(*stage_rows(report)), ""]
    else:
        out += ["_No workflow report.json found._", ""]

    out += ["## Deployment target and ANE guidance", "", *[f"- {line}" for line in target_lines(report)], ""]
    rows = target_rows(report.used)
    if rows:
        out += [markdown_table(["spec", "needs", "layers"], [[s, f"iOS{t} / macOS{t - 3}", ", ".join(layers)]
                                                             for s, t, layers in rows]), ""]
    out += [f"- **{a.level}** {a.topic}: {a.text}" + (f" ({', '.join(a.layers)})" if a.layers else "")
            for a in report.advice] + [""]

    out += ["## Inputs", "", *[f"- {kind}: `{path}`" for kind, path in found.describe()], ""]
    missing = found.missing()
    if missing:
        out += ["Not found:", "", *[f"- {m}" for m in missing], ""]
    if report.notes:
        out += ["Notes:", "", *[f"- {n}" for n in report.notes], ""]
    return "\n".join(out), images
