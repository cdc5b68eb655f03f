"""`coreml-opt report`: a real run folder (sweep, planner plan, emitted package, workflow) rendered to HTML + Markdown,
then checked in headless Chromium: no console errors, every section rendered, every plot decoded.

A screenshot is kept as a test artifact: ``$COREML_OPT_ARTIFACTS/report.png`` (default ``test-artifacts/``
in the repository root). The browser tests use ``chromium`` (Debian's package, which ``.ci/run`` installs) where it is on
PATH and skip with the reason where it is not; the tests themselves install nothing.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import run_cli

CANDIDATES = ["int4/block32", "pal4/g16", "pal1"]  # per-block scales, grouped LUTs, a harmful 1-bit palette
SECTION_IDS = ["summary", "results", "inventory", "sensitivity", "pareto", "plan", "workflow", "deployment", "inputs"]


class RunFixture(NamedTuple):
    root: Path
    result: object  # planning PlanResult of the chosen plan
    original: Path
    emitted: Path


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory, example_mlpackage) -> RunFixture:
    """sens/ (real sweep), plan.yaml (planner, 3 bits per weight), the original and the emitted package, and a
    data-free workflow run of the same plan under workflow/."""
    from coreml_opt.planning import PlanningSession
    from coreml_opt.sensitivity import analyse
    from coreml_opt.workflows import parse_workflow, run_workflow

    root = tmp_path_factory.mktemp("run")
    analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), "coreml_opt.sensitivity.examples:digits_heldout", "accuracy",
            candidates=CANDIDATES, out_dir=root / "sens", progress=False)
    original = root / "digits.mlpackage"
    shutil.copytree(example_mlpackage, original)
    session = PlanningSession.open(root / "sens")
    result = session.plan(bpw=3)
    result.plan.save(root / "plan.yaml")
    emitted = root / "digits-plan.mlpackage"
    session.emit(result, emitted, model_package=original)
    workflow = parse_workflow({"name": "digits-plan", "model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
                               "target": "iOS18", "plan": result.plan.to_dict(), "stages": [{"data_free": {}}],
                               "eval": {"data": "digits-test", "metric": "accuracy"}, "out": str(root / "workflow")})
    run_workflow(workflow, progress=False)
    return RunFixture(root, result, original, emitted)


@pytest.fixture(scope="session")
def written(run_folder, tmp_path_factory):
    """The report of the run folder, written once."""
    from coreml_opt.report.html import write_report

    out = tmp_path_factory.mktemp("report") / "report.html"
    return write_report(run_folder.root, out)


def test_page_has_every_section_and_plot_embedded(written):
    page = written.html.read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page and f'href="#{sid}"' in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert sorted(images) == ["Pareto front", "bits per weight per layer", "sensitivity heatmap"]
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # self-contained: nothing else to fetch
    assert "<script" not in page


def test_markdown_beside_it_has_the_same_sections_and_its_plots(written):
    text = written.markdown.read_text()
    assert written.markdown == written.html.with_suffix(".md")
    for heading in ("Summary", "Before and after", "Model inventory", "Sensitivity", "Size vs accuracy", "Plan",
                    "Workflow stages", "Deployment target and ANE guidance", "Inputs"):
        assert f"\n## {heading}\n" in text
    for png in written.images:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text
    assert len(written.images) == 3


def test_sizes_are_the_packages_and_the_measured_plan_accuracy(run_folder, written):
    from coreml_opt.model.package import load_package

    report = written.report
    before, after = report.before_after()
    original = load_package(run_folder.original, load_weights=False).inventory
    emitted = load_package(run_folder.emitted, load_weights=False).inventory
    assert before.bytes == original.total_bytes and before.metric == report.sweep["baseline"]
    assert report.original.path == run_folder.original and not report.original_derived
    # the workflow's data-free stage is the newest result: the summary compares against it
    stage = report.stages[0]
    assert after.label == "stage data_free" and after.bytes == emitted.total_bytes == stage.bytes
    assert after.metric == stage.metric < before.metric  # 3 bits per weight costs accuracy on this sweep
    page = written.html.read_text()
    assert f"{100 * before.metric:.2f} % → {100 * after.metric:.2f} %" in page
    assert f"{before.bytes / after.bytes:.2f}x smaller" in page


def test_plan_without_saved_figures_is_measured_now(run_folder, tmp_path):
    from coreml_opt.report.collect import collect

    for name in ("sens", "plan.yaml", "digits-plan.mlpackage"):
        src = run_folder.root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    report = collect(tmp_path)
    row = report.before_after()[1]
    assert row.label == "plan -> digits-plan.mlpackage" and row.source.startswith("measured now")
    assert row.metric == pytest.approx(run_folder.result.measured_metric)  # the planner's own measurement
    assert report.plan_point["metric"] == row.metric
    assert report.plan_point["bits_per_weight"] == pytest.approx(run_folder.result.bits_per_weight)


def test_pareto_plot_marks_the_chosen_plan(run_folder, written):
    point, stage = written.report.plan_point, written.report.stages[0]
    assert point["bits_per_weight"] == pytest.approx(run_folder.result.bits_per_weight)
    assert point["metric"] == stage.metric and "stage data_free" in point["label"]
    assert "star is the chosen plan" in written.report.front_note


def test_inventory_lists_bits_per_weight_per_layer_for_every_package(run_folder, written):
    report = written.report
    labels = [p.label for p in report.compressed]
    assert labels == ["workflow/data_free.mlpackage", "digits-plan.mlpackage"]
    page = written.html.read_text()
    for layer, spec in run_folder.result.specs.items():
        row = re.search(rf"<tr><td>{re.escape(layer)}</td>.*?</tr>", page).group(0)
        assert f"<td>{spec}</td>" in row
    emitted = next(p for p in report.compressed if p.label == "digits-plan.mlpackage").inventory
    for w in emitted.weights:
        assert f"{8 * w.bytes / w.params:.2f}" in page


def test_guidance_comes_from_the_specs_in_use(run_folder, written):
    topics = {a.topic: a for a in written.report.advice}
    used = set(run_folder.result.specs.values())
    assert ("per-block quantization" in topics) == ("int4/block32" in used)
    assert ("grouped palettes" in topics) == ("pal4/g16" in used)
    assert ("per-tensor palettes" in topics) == ("pal1" in used)
    assert "per-channel quantization" not in topics and "pruning" not in topics
    assert "needs iOS18" in topics["deployment target"].text


def test_guidance_rules_fire_only_for_matching_specs():
    from coreml_opt.report.guidance import UsedSpec, advise
    from coreml_opt.spec import parse_spec

    def used(spec: str, shape=(128, 64)) -> UsedSpec:
        return UsedSpec("fc", "linear", shape, parse_spec(spec))

    block = advise([used("int4/block32")], package_target=18)
    assert [a.level for a in block if a.topic == "per-block quantization"] == ["warn"]
    assert "GPU" in next(a.text for a in block if a.topic == "per-block quantization")
    channel = advise([used("int8")], package_target=16)
    assert [a.topic for a in channel] == ["deployment target", "per-channel quantization"]
    many = advise([used("pal4/g4")], package_target=18)
    assert next(a for a in many if a.topic == "many LUT groups").layers == ["fc (32 LUTs)"]
    too_old = advise([used("int4")], package_target=16, plan_target="iOS16")
    assert [a.level for a in too_old if a.topic == "deployment target"] == ["info", "error", "error"]
    newer = advise([used("int8")], package_target=18)
    assert "could reach older devices" in newer[1].text


def test_empty_folder_names_everything_missing(tmp_path):
    from coreml_opt.report.html import write_report

    (tmp_path / "run").mkdir()
    files = write_report(tmp_path / "run", tmp_path / "r.html", markdown=None)
    page = files.html.read_text()
    assert files.markdown is None and not (tmp_path / "r.md").exists()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    assert "<img" not in page
    assert len(files.missing) == 4 and all(m.split(" ")[0] in page for m in files.missing)


def test_sweep_folder_alone_gives_heatmap_and_predicted_front(run_folder, tmp_path):
    from coreml_opt.report.html import write_report

    sweep = shutil.copytree(run_folder.root / "sens", tmp_path / "sens")
    files = write_report(sweep, tmp_path / "r.html", measure=False)
    report = files.report
    assert report.heatmap_png and report.front_png and report.plan is None and report.original is None
    assert "no plan found to mark" in report.front_note and report.front_note.startswith("solved, greedy")
    assert [r.label for r in report.results] == ["fp32 weights (PyTorch)", "original (fp16)"]
    assert any(m.startswith(".mlpackage") for m in files.missing)


def test_saved_plan_json_is_preferred_to_measuring_again(run_folder, tmp_path):
    import json

    from coreml_opt.planning import PlanningSession
    from coreml_opt.planning.pareto import points_json
    from coreml_opt.report.collect import collect

    root = tmp_path / "run"
    shutil.copytree(run_folder.root / "sens", root / "sens")
    shutil.copytree(run_folder.emitted, root / "model-plan.mlpackage")
    front = PlanningSession.open(root / "sens", measure=False).front([4, 8], validate=False)
    doc = {"budget": "3 bits per weight", "bits_per_weight": 3.0, "layers": run_folder.result.specs,
           "measured_metric": 0.5, "emitted": "model-plan.mlpackage", "front": points_json(front)}
    (root / "plan.json").write_text(json.dumps(doc))
    report = collect(root, measure=True)
    assert report.plan_path == root / "plan.json" and report.plan_point["metric"] == 0.5
    assert report.original_derived and report.before_after()[1].metric == 0.5
    assert report.front_note.startswith("front points from plan.json")


def test_report_is_written_atomically(run_folder, tmp_path, monkeypatch):
    from coreml_opt.report import html

    out = tmp_path / "report.html"
    out.write_text("previous")

    def broken(report):
        raise RuntimeError("render failed")

    monkeypatch.setattr(html, "render_html", broken)
    with pytest.raises(RuntimeError):
        html.write_report(tmp_path, out, markdown=None, measure=False)
    assert out.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_cli_writes_both_files_and_names_missing_inputs(run_folder, tmp_path):
    sweep = shutil.copytree(run_folder.root / "sens", tmp_path / "sens")
    code, out, err = run_cli("report", str(sweep), "-o", str(tmp_path / "page.html"), "--no-measure")
    assert code == 0, err
    assert f"wrote {tmp_path / 'page.html'} and {tmp_path / 'page.md'}" in out
    assert "not found: plan" in out and (tmp_path / "page-heatmap.png").is_file()
    code, out, err = run_cli("report", str(tmp_path / "nope"), "-o", str(tmp_path / "x.html"))
    assert code == 2 and err.count("\n") == 1 and "is not a folder" in err and not (tmp_path / "x.html").exists()


# ---- headless Chromium ------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0"]
# Runs after load: counts decoded images and measures each section, where --dump-dom can read them.
PROBE = """<script>window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images", ok.length + "/" + imgs.length);
  document.body.setAttribute("data-sections", Array.prototype.map.call(document.querySelectorAll("section[id]"),
    function (s) { return s.id + ":" + Math.round(s.getBoundingClientRect().height); }).join(","));
});</script>"""


def find_chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (as .ci/run does) to run the browser checks")
    return exe


def run_chromium(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True, text=True,
                          timeout=120)


def load_page(exe: str, html: Path, tmp: Path) -> tuple[str, list[str]]:
    """(DOM after load, Console lines) of ``html`` with the probe script added to a copy."""
    probe = tmp / f"probe-{html.name}"
    probe.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    done = run_chromium(exe, tmp, "--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def body_attr(dom: str, name: str) -> str:
    match = re.search(rf'<body[^>]*\s{name}="([^"]*)"', dom)
    assert match, f"probe did not run: no {name} on <body>"
    return match.group(1)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_loads_cleanly_with_every_section_and_plot(chromium, written, tmp_path):
    dom, console = load_page(chromium, written.html, tmp_path)
    assert console == []
    assert body_attr(dom, "data-images") == "3/3"
    heights = dict(item.split(":") for item in body_attr(dom, "data-sections").split(","))
    assert list(heights) == SECTION_IDS and all(int(h) > 40 for h in heights.values())
    for alt, section in (("sensitivity heatmap", "sensitivity"), ("Pareto front", "pareto"),
                         ("bits per weight per layer", "inventory")):
        block = re.search(rf'<section id="{section}">.*?</section>', dom, re.S).group(0)
        assert f'alt="{alt}"' in block


def test_screenshot_is_kept_as_an_artifact(chromium, written, tmp_path):
    shot = tmp_path / "report.png"
    done = run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", written.html.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert png_size(shot) == (1280, 2400) and shot.stat().st_size > 50_000  # a rendered page, not a blank one
    artifacts = Path(os.environ.get("COREML_OPT_ARTIFACTS") or ROOT / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifacts / "report.png")
    shutil.copy(written.html, artifacts / "report.html")


def test_the_check_catches_console_errors_and_broken_images(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><section id="a">x</section>'
                    '<img alt="bad" src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>')
    dom, console = load_page(chromium, page, tmp_path)
    assert len(console) == 1 and "boom" in console[0]
    assert body_attr(dom, "data-images") == "0/1"


def test_plan_json_measured_on_the_package_is_shown_beside_the_simulated_figure(run_folder, tmp_path):
    import json

    from coreml_opt.report.collect import collect

    root = tmp_path / "run"
    shutil.copytree(run_folder.root / "sens", root / "sens")
    shutil.copytree(run_folder.emitted, root / "model-plan.mlpackage")
    doc = {"budget": "3 bits per weight", "bits_per_weight": 3.0, "layers": run_folder.result.specs,
           "measured_metric": 0.5, "emitted": "model-plan.mlpackage",
           "measured_on_package": {"metric_name": "accuracy", "measured": 0.25, "simulated": 0.5}}
    (root / "plan.json").write_text(json.dumps(doc))
    report = collect(root, measure=False)
    (row,) = [r for r in report.results if r.label.startswith("plan -> ")]
    assert row.metric == 0.5 and row.source.endswith("; 25.00 % measured on the package (runtime)")
