"""Every fenced code block of README.md runs on the bundled example (or, where it cannot here, is checked).

Blocks are read from README.md itself, so a new block is covered without editing this file. They run in README
order in one scratch folder, as a reader following the README would: the repository's data folders are copied in,
and ``coreml-opt``, ``python`` and ``python3`` there are this interpreter with this checkout on PYTHONPATH. Blocks
that run long end-to-end commands are marked ``slow`` (see SLOW); ``.ci/run`` runs them after the default suite.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DATA_FOLDERS = ("sensitivity", "workflows", "calibration_data")

# The set-up prefix of the README's two install commands. The environment under test is already installed, and a
# new venv plus `pip install` needs a package index and minutes, so the prefix is checked (its extras exist), not run.
SETUP_PREFIX = re.compile(r'^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e (\.|"\.\[(\w+)\]") && ')

# Blocks (after the set-up prefix) that are checked but not run, each with the reason.
NOT_RUN = {
    "python -m pytest -q": "it is this test suite; .ci/run runs the README's test command verbatim "
                           "(test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one)",
}

# A block that runs any of these is marked slow (run by `pytest -m slow` and .ci/run), with the reason.
SLOW = {
    r"coreml-opt example": "trains or loads the example CNN, converts, compresses and evaluates it",
    r"coreml-opt sensitivity|python -m coreml_opt\.sensitivity": "a sensitivity sweep over every layer",
    r"coreml-opt plan ": "plans are measured on a sweep made by an earlier block",
    r"coreml-opt run |xcode-prep -w": "a workflow with calibration and DKM fine-tuning",
    r"coreml-opt report ": "reports a run folder made by an earlier slow block",
}

# A block that runs any of these needs the named optional module (an extra); it skips with the reason without it.
NEEDS = {
    r"--executor ray|\bray start\b": ("ray", 'Ray is not installed (pip install -e ".[ray]"; .ci/run does)'),
}

# Options whose value is a file or folder the command writes: it must exist after the block.
OUTPUT_OPTIONS = {"-o", "--out", "--output", "--emit", "--front"}


class Block(NamedTuple):
    """One fenced code block: its language, text, the README line of its opening fence, and the heading above."""

    lang: str
    text: str
    line: int
    section: str


def readme_blocks(text: str) -> list[Block]:
    """The fenced (```) code blocks of a Markdown text, in order; raises ValueError on an unclosed fence."""
    blocks: list[Block] = []
    section, opened, lang, body = "", 0, "", []
    for number, line in enumerate(text.splitlines(), 1):
        if opened:
            if line.strip() == "```":
                blocks.append(Block(lang, "\n".join(body) + "\n", opened, section))
                opened = 0
            else:
                body.append(line)
        elif line.startswith("```"):
            opened, lang, body = number, line[3:].strip(), []
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
    if opened:
        raise ValueError(f"README.md:{opened}: code block is never closed")
    return blocks


BLOCKS = readme_blocks(README.read_text())


def runnable(block: Block) -> str:
    """The block's text as run here: the set-up prefix of an install command removed."""
    return SETUP_PREFIX.sub("", block.text)


def slow_reasons(block: Block) -> list[str]:
    return [reason for pattern, reason in SLOW.items() if re.search(pattern, runnable(block))]


def block_id(block: Block) -> str:
    return f"L{block.line}-{block.lang or 'text'}-{re.sub(r'[^a-z0-9]+', '-', block.section.lower()).strip('-')}"


def block_params() -> list:
    return [pytest.param(b, id=block_id(b), marks=[pytest.mark.slow] if slow_reasons(b) else [])
            for b in BLOCKS]


def write_shim(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {target} \"$@\"\n")
    path.chmod(0o755)


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory, example_mlpackage) -> Path:
    """The scratch folder the README's blocks run in, also Xcode's $SRCROOT. It holds what blocks take from earlier
    sections: ``digits.mlpackage`` (the Commands block's `convert` line writes the same model) and ``plan.yaml``
    (the Plans section's YAML block), so a block runs even when the slow blocks before it are deselected."""
    root = tmp_path_factory.mktemp("readme")
    for name in DATA_FOLDERS:
        shutil.copytree(ROOT / name, root / name)
    for name in ("coreml-opt", ".venv/bin/coreml-opt"):
        write_shim(root / "bin" / name if "/" not in name else root / name, "-m coreml_opt.cli")
    for name in ("python", "python3"):
        write_shim(root / "bin" / name, "")
    # `ray start`/`ray stop` start and kill only this test's nodes (the real `ray stop` stops every Ray process)
    write_shim(root / "bin" / "ray", shlex.quote(str(ROOT / "tests" / "ray_shim.py")))
    plan = next(b for b in BLOCKS if b.lang == "yaml" and b.section == "Plans").text
    (root / "plan.yaml").write_text(plan)
    shutil.copytree(example_mlpackage, root / "digits.mlpackage")
    # The Xcode project of the build-phase section: its Input Files under $SRCROOT/Models.
    models = root / "Models"
    shutil.copytree(example_mlpackage, models / "Digits.mlpackage")
    (models / "digits-plan.yaml").write_text(plan)
    shutil.copy(ROOT / "workflows" / "digits-pal2.yaml", models / "digits-pal2.yaml")
    shutil.copytree(ROOT / "calibration_data", models / "calibration_data")  # in case paths resolve beside the file
    return root


def block_env(root: Path, block: Block) -> dict[str, str]:
    """The environment a block runs in; an Xcode script block gets what a Run Script phase sets."""
    env = {**os.environ, "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "RAY_SHIM_DIR": str(root)}
    if "$SRCROOT" in block.text:
        inputs = (["Models/digits-pal2.yaml"] if " -w " in block.text
                  else ["Models/Digits.mlpackage", "Models/digits-plan.yaml"])
        env.update({"SRCROOT": str(root), "DERIVED_FILE_DIR": str(root / "DerivedSources"),
                    "SCRIPT_INPUT_FILE_COUNT": str(len(inputs)),
                    "SCRIPT_OUTPUT_FILE_COUNT": "1", "SCRIPT_OUTPUT_FILE_0": str(root / "DerivedSources/Digits.mlpackage")})
        env.update({f"SCRIPT_INPUT_FILE_{i}": str(root / p) for i, p in enumerate(inputs)})
    return env


def written_paths(script: str, env: dict[str, str]) -> list[str]:
    """The paths a shell block's commands name as outputs (-o, --out, --emit, --front), variables expanded."""
    paths = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        paths += [re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), value)
                  for option, value in zip(words, words[1:]) if option in OUTPUT_OPTIONS]
    return paths


def run_block(root: Path, block: Block) -> subprocess.CompletedProcess:
    env = block_env(root, block)
    script = runnable(block)
    if block.lang == "python":
        command = [sys.executable, "-c", script]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", script]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=3600)


def check_plan_yaml(text: str, inventory) -> None:
    from coreml_opt.plan import Plan

    Plan.from_dict(yaml.safe_load(text)).resolve(inventory)  # raises PlanError naming what is wrong


@pytest.mark.parametrize("block", block_params())
def test_readme_block_runs(block: Block, readme_dir: Path, example_conversion):
    """Run one README block in the shared scratch folder; it exits 0, prints no traceback and writes its outputs."""
    text = runnable(block)
    if text.strip() in NOT_RUN:
        pytest.skip(f"README.md:{block.line} is not run here: {NOT_RUN[text.strip()]}")
    if block.lang == "yaml":
        from coreml_opt.model.package import load_package

        check_plan_yaml(block.text, load_package(readme_dir / "digits.mlpackage", load_weights=False).inventory)
        return
    assert block.lang in ("bash", "sh", "python"), f"README.md:{block.line}: no runner for ```{block.lang} blocks"
    for pattern, (module, reason) in NEEDS.items():
        if re.search(pattern, text) and importlib.util.find_spec(module) is None:
            pytest.skip(f"README.md:{block.line}: {reason}")
    try:
        done = run_block(readme_dir, block)
    finally:
        if re.search(r"\bray start\b", text):  # the cluster goes, whatever the block did
            subprocess.run([str(readme_dir / "bin" / "ray"), "stop"], env=block_env(readme_dir, block),
                           capture_output=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README.md:{block.line} exited {done.returncode}:\n{output[-4000:]}"
    assert "Traceback (most recent call last)" not in output, output[-4000:]
    if block.lang != "python":
        for path in written_paths(text, block_env(readme_dir, block)):
            assert (readme_dir / path).exists(), f"README.md:{block.line}: wrote no {path}"


def test_every_block_is_parsed_and_has_a_runner():
    """Checked without running anything: shells parse (bash -n), Python compiles, YAML loads; no stale entries."""
    assert len(BLOCKS) >= 10 and {b.lang for b in BLOCKS} <= {"bash", "sh", "python", "yaml"}
    for block in BLOCKS:
        where = f"README.md:{block.line}"
        if block.lang == "python":
            compile(block.text, where, "exec")
        elif block.lang == "yaml":
            assert isinstance(yaml.safe_load(block.text), dict), where
        else:
            done = subprocess.run(["bash", "-n", "-c", block.text], capture_output=True, text=True)
            assert done.returncode == 0, f"{where}: {done.stderr}"
    texts = {runnable(b).strip() for b in BLOCKS}
    assert set(NOT_RUN) <= texts, "NOT_RUN names a block the README no longer has"
    assert all(any(re.search(p, t) for t in texts) for p in SLOW), "SLOW names a command the README no longer runs"
    assert all(any(re.search(p, t) for t in texts) for p in NEEDS), "NEEDS names a command the README no longer runs"


def test_setup_prefix_names_only_extras_the_project_has():
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    prefixes = [SETUP_PREFIX.match(b.text) for b in BLOCKS if b.text.startswith("python3 -m venv")]
    assert len(prefixes) == 2 and all(prefixes)
    assert {m.group(2) for m in prefixes if m.group(2)} <= extras


def test_readme_python_snippet_exports_passes_and_a_single_technique_yaml(readme_dir, tmp_path):
    """The README's plan mixes techniques: it is several coremltools passes, and coreml_yaml refuses it in one
    PlanError; the snippet shows the passes and a single-technique plan's YAML (it used to call coreml_yaml on it)."""
    import coremltools.optimize.coreml as cto

    from coreml_opt.errors import PlanError
    from coreml_opt.model.package import load_package
    from coreml_opt.plan import Plan

    snippet = next(b for b in BLOCKS if b.lang == "python").text
    assert "Plan.load(\"plan.yaml\")" in snippet and "plan.coreml_yaml(" not in snippet
    inventory = load_package(readme_dir / "digits.mlpackage", load_weights=False).inventory
    plan = Plan.load(readme_dir / "plan.yaml")
    assert [p.function for p in plan.to_coreml(inventory)] == ["prune_weights", "palettize_weights",
                                                              "linear_quantize_weights"]
    with pytest.raises(PlanError, match="mixes techniques"):
        plan.coreml_yaml(inventory)
    exported = tmp_path / "int8.yaml"
    int8 = Plan.from_spec("int8")
    exported.write_text(int8.coreml_yaml(inventory))  # MIL dtypes used to be written as "int", which it refuses
    config = cto.OptimizationConfig.from_yaml(str(exported))  # coremltools reads it back
    assert config.global_config == cto.OpLinearQuantizerConfig(dtype="int8", weight_threshold=int8.weight_threshold)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = README.read_text()
    commands = re.findall(r"^python3 -m venv .venv .*$", readme, flags=re.M)
    assert len(commands) == 2
    assert commands[0].endswith("coreml-opt example --out out/example")
    assert commands[1].endswith("python -m pytest -q") and '".[test]"' in commands[1]
    assert "grep -m1 -E '^python3 -m venv .venv .*pytest' README.md" in (ROOT / ".ci" / "run").read_text()
