"""Xcode Run Script build phase: compress a model by a plan, skip unchanged inputs, report Xcode issues.

``prepare`` writes a byte-reproducible ``.mlpackage`` and a stamp file beside it; when the model's
files, the plan text, coreml-opt and coremltools are unchanged (and the output is still what was
written), it does nothing. ``issue_for_error`` turns an error into the ``file:line: error:`` form
Xcode's issue navigator shows, locating the plan line at fault by YAML node marks.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from . import __version__
from .errors import CoreMLOptError, ModelError, PlanError

logger = logging.getLogger(__name__)

STAMP_SUFFIX = ".coreml-opt-stamp.json"
_PLAN_FILE_KEYS = ("target", "weight_threshold", "global", "op_types", "layers", "skip", "kmeans")


@dataclass(frozen=True)
class XcodeIssue:
    """One line for Xcode's issue navigator: severity, message, and the file and line at fault if known."""

    severity: Literal["error", "warning"]
    message: str
    file: Path | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.file is None:
            return f"{self.severity}: {self.message}"
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        return f"{where}: {self.severity}: {self.message}"


@dataclass
class PrepResult:
    """What ``prepare`` did: ``compressed`` (``report`` set) or ``up-to-date`` (nothing touched)."""

    output: Path
    status: Literal["compressed", "up-to-date"]
    stamp: Path
    report: Any = None  # CompressionReport when compressed
    warnings: list[XcodeIssue] = field(default_factory=list)


# ---- fingerprints and the stamp ---------------------------------------------------------------
def tree_sha256(path: str | os.PathLike) -> str:
    """SHA-256 over every file of a folder (relative path, size and content), or of one file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        (p for p in path.rglob("*") if p.is_file() and p.name != ".DS_Store"), key=lambda p: p.relative_to(path).as_posix())
    total = hashlib.sha256()
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        rel = file.relative_to(path).as_posix() if file != path else file.name
        total.update(f"{rel}\0{file.stat().st_size}\0{digest.hexdigest()}\n".encode())
    return total.hexdigest()


def stamp_path(output: str | os.PathLike) -> Path:
    """The stamp beside the output: hidden, outside the package, so Xcode never copies or compiles it."""
    output = Path(output)
    return output.parent / f".{output.name}{STAMP_SUFFIX}"


def input_fingerprint(model: str | os.PathLike, plan: str | os.PathLike) -> dict[str, str]:
    """Everything the output depends on: model files, plan text, coreml-opt and coremltools versions."""
    return {"model_sha256": tree_sha256(model), "plan_sha256": hashlib.sha256(Path(plan).read_bytes()).hexdigest(),
            "coreml_opt": __version__, "coremltools": metadata.version("coremltools")}


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def prepare(model: str | os.PathLike, plan: str | os.PathLike, output: str | os.PathLike, *,
            force: bool = False, env: Mapping[str, str] | None = None) -> PrepResult:
    """Compress ``model`` by the plan file into ``output`` unless the stamp shows identical inputs and output."""
    model, plan, output = (Path(p).absolute() for p in (model, plan, output))
    warnings = declared_file_warnings(model, plan, output, env if env is not None else {})
    if not model.is_dir():
        from .model.package import load_package

        load_package(model, load_weights=False)  # raises the one-line ModelError for this input
    if not plan.is_file():
        raise PlanError(str(plan), "does not exist", "check the path of the plan file")
    if output.resolve() == model.resolve():
        raise PlanError(str(output), "is the input model", "write the compressed model to another path")
    stamp = stamp_path(output)
    inputs = input_fingerprint(model, plan)
    previous = _read_stamp(stamp)
    if (not force and previous is not None and previous.get("inputs") == inputs and output.is_dir()
            and previous.get("output_sha256") == tree_sha256(output)):
        logger.info("%s is up to date: inputs unchanged since %s was written", output, stamp.name)
        return PrepResult(output, "up-to-date", stamp, warnings=warnings)

    from .compress import compress
    from .model.package import atomic_output
    from .plan import Plan

    loaded_plan = Plan.load(plan)
    logger.info("compressing %s by %s into %s", model, plan, output)
    report = compress(model, loaded_plan, output)  # atomic, single-threaded, reproducible bytes
    if all(w.spec == "none" for w in report.weights):
        warnings.append(XcodeIssue("warning", f"{plan} compresses no weight of {model.name}; the output is a copy"))
    with atomic_output(stamp) as tmp:
        tmp.write_text(json.dumps({"inputs": inputs, "output_sha256": tree_sha256(output),
                                   "model": str(model), "plan": str(plan)}, indent=2, sort_keys=True) + "\n")
    return PrepResult(output, "compressed", stamp, report, warnings)


# ---- Xcode's environment ----------------------------------------------------------------------
def _script_files(env: Mapping[str, str], kind: str) -> list[str]:
    count = env.get(f"SCRIPT_{kind}_FILE_COUNT")
    indices = range(int(count)) if count and count.isdigit() else range(64)
    files = [env.get(f"SCRIPT_{kind}_FILE_{i}") for i in indices]
    return [f for f in files if f]


def resolve_arguments(model: str | None, plan: str | None, output: str | None,
                      env: Mapping[str, str]) -> tuple[str, str, str]:
    """Fill omitted arguments from a Run Script phase's files: the ``.mlpackage`` input, the ``.yaml`` input, output 0."""
    inputs = _script_files(env, "INPUT")
    outputs = _script_files(env, "OUTPUT")
    if model is None:
        model = next((f for f in inputs if f.rstrip("/").endswith(".mlpackage")), None)
    if plan is None:
        plan = next((f for f in inputs if f.endswith((".yaml", ".yml"))), None)
    if output is None and outputs:
        output = outputs[0]
    for value, what, fix in ((model, "MODEL", "pass it or list the .mlpackage under the phase's Input Files"),
                             (plan, "plan (-c)", "pass -c plan.yaml or list the plan under the phase's Input Files"),
                             (output, "output (-o)", "pass -o OUT.mlpackage or list it under the phase's Output Files")):
        if value is None:
            raise CoreMLOptError(f"xcode-prep {what}", "was not given and no Xcode script file provides it", fix)
    return model, plan, output


def declared_file_warnings(model: Path, plan: Path, output: Path, env: Mapping[str, str]) -> list[XcodeIssue]:
    """Inside Xcode, warn about inputs or outputs the phase does not declare (Xcode then skips or misorders it)."""
    if "SCRIPT_INPUT_FILE_COUNT" not in env and "SCRIPT_OUTPUT_FILE_COUNT" not in env:
        return []
    declared_in = {Path(f).absolute() for f in _script_files(env, "INPUT")}
    declared_out = {Path(f).absolute() for f in _script_files(env, "OUTPUT")}
    issues = [XcodeIssue("warning", f"{path} is not among the Run Script phase's Input Files; "
                                    f"Xcode will not rerun the phase when it changes")
              for path in (model, plan) if path not in declared_in]
    if output not in declared_out:
        issues.append(XcodeIssue("warning", f"{output} is not among the Run Script phase's Output Files; "
                                            f"add it so Xcode orders and compiles it"))
    return issues


# ---- errors as Xcode issues -------------------------------------------------------------------
def plan_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of each top-level key, each section entry and each ``skip`` item of a plan YAML."""
    root = yaml.compose(text)
    lines: dict[tuple[str, ...], int] = {}
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key, value in root.value:
        lines[(str(key.value),)] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            for sub_key, _ in value.value:
                lines[(str(key.value), str(sub_key.value))] = sub_key.start_mark.line + 1
        elif isinstance(value, yaml.SequenceNode):
            for item in value.value:
                if isinstance(item, yaml.ScalarNode):
                    lines[(str(key.value), str(item.value))] = item.start_mark.line + 1
    return lines


def _candidate_keys(name: str, problem: str, whole_plan: bool) -> list[tuple[str, ...]]:
    """YAML key paths an error's input name may point at, most specific first."""
    if whole_plan:  # "has unknown field(s) ['x']": point at the first unknown key
        listed = re.search(r"\[.*?\]", problem)
        return [(str(f),) for f in ast.literal_eval(listed.group(0))] if listed else []
    quoted = re.fullmatch(r"layer ('.*'|\".*\")", name)
    if quoted:
        key = ast.literal_eval(quoted.group(1))
        return [("layers", key), ("skip", key)]
    head = name.split(" (")[0].strip()
    word = head.split(" ")[0]
    if word in _PLAN_FILE_KEYS and " " in head:  # "weight_threshold -1", "kmeans 'x'"
        return [(word,)]
    section, _, rest = head.partition(".")
    if section in ("op_types", "layers") and rest:
        return [(section, rest), ("skip", rest)]
    if head in _PLAN_FILE_KEYS:
        return [(head,)]
    return [("layers", head), ("skip", head)] if head else []


def issue_for_error(exc: CoreMLOptError, plan: str | os.PathLike | None = None) -> XcodeIssue:
    """An Xcode ``error:`` issue for ``exc``, pointing at the plan line at fault where one can be found."""
    message = f"{exc.input_name}: {exc.problem}; {exc.fix}"
    if plan is None or isinstance(exc, ModelError) or not Path(plan).is_file():
        return XcodeIssue("error", message)
    plan = Path(plan).absolute()
    try:
        lines = plan_key_lines(plan.read_text(errors="replace"))
    except yaml.YAMLError as yaml_exc:
        mark = getattr(yaml_exc, "problem_mark", None) or getattr(yaml_exc, "context_mark", None)
        problem = getattr(yaml_exc, "problem", None) or "invalid YAML"
        return XcodeIssue("error", f"not valid YAML: {problem}; fix the syntax", plan,
                          mark.line + 1 if mark is not None else None)
    name = exc.input_name
    whole_plan = name == str(plan)
    name = name[len(str(plan)) + 2:] if name.startswith(f"{plan}: ") else name
    for key in _candidate_keys(name, exc.problem, whole_plan):
        if key in lines:
            return XcodeIssue("error", f"{'plan' if whole_plan else name}: {exc.problem}; {exc.fix}", plan, lines[key])
    return XcodeIssue("error", message)
