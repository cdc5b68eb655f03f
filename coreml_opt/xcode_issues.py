"""Errors as Xcode issues: ``file:line: error: message`` lines, the line found by YAML node marks.

Plans and workflows share the lookup: ``yaml_key_lines`` maps every key path of a YAML document to
its line, and an error's input name (``layer 'x'``, ``/abs/wf.yaml: stages[1].calibration.data``)
is turned into candidate key paths, most specific first.
"""
from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import CoreMLOptError, ModelError

_PLAN_FILE_KEYS = ("target", "weight_threshold", "global", "op_types", "layers", "skip", "kmeans")
_WHOLE_FILE = ("has unknown field", "is not valid YAML", "is not a mapping")


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


def yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every mapping key and sequence item of a YAML document by key path; sequence
    items by index (``("stages", "1")``) and scalar items also by value (``("skip", "features.0")``)."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, str(key.value))] = key.start_mark.line + 1
                walk(value, (*path, str(key.value)))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, str(index))] = item.start_mark.line + 1
                walk(item, (*path, str(index)))
            for item in node.value:
                if isinstance(item, yaml.ScalarNode):
                    lines[(*path, str(item.value))] = item.start_mark.line + 1

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def workflow_plan_file(raw: Any, workflow: Path) -> Path | None:
    """The plan file a workflow document's ``plan:`` names, resolved as ``load_workflow`` does; else None."""
    value = raw.get("plan") if isinstance(raw, dict) else None
    if not isinstance(value, str) or not (value.endswith((".yaml", ".yml")) or os.sep in value):
        return None
    from .yaml_files import path_beside

    return path_beside(value, workflow.parent).absolute()


def _candidate_keys(name: str, problem: str, whole_plan: bool) -> list[tuple[str, ...]]:
    """Plan key paths an error's input name may point at, most specific first."""
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


def _plan_line(name: str, problem: str, whole: bool, lines: dict[tuple[str, ...], int],
               prefix: tuple[str, ...] = ()) -> int | None:
    """Line of the plan entry an error names; ``prefix`` is where the plan sits (``("plan",)`` inline)."""
    return next((lines[(*prefix, *key)] for key in _candidate_keys(name, problem, whole)
                 if (*prefix, *key) in lines), None)


def _read_lines(path: Path) -> tuple[dict[tuple[str, ...], int], XcodeIssue | None]:
    """Key lines of a YAML file, or the issue pointing at its syntax error."""
    try:
        return yaml_key_lines(path.read_text(errors="replace")), None
    except yaml.YAMLError as yaml_exc:
        mark = getattr(yaml_exc, "problem_mark", None) or getattr(yaml_exc, "context_mark", None)
        problem = getattr(yaml_exc, "problem", None) or "invalid YAML"
        return {}, XcodeIssue("error", f"not valid YAML: {problem}; fix the syntax", path,
                              mark.line + 1 if mark is not None else None)


def _plan_file_issue(name: str, problem: str, fix: str, plan: Path) -> XcodeIssue | None:
    """The issue at the plan file's line for an error named ``name`` (``str(plan)``: the whole plan)."""
    lines, bad = _read_lines(plan)
    if bad is not None:
        return bad
    whole = name == str(plan)
    name = name[len(str(plan)) + 2:] if name.startswith(f"{plan}: ") else name
    line = _plan_line(name, problem, whole, lines)
    if line is None:
        return None
    return XcodeIssue("error", f"{'plan' if whole else name}: {problem}; {fix}", plan, line)


def _split_nested(text: str) -> tuple[str, str, bool]:
    """(name, problem, whole plan?) of a plan error the workflow wrapped as ``name: problem``."""
    if text.startswith(_WHOLE_FILE):
        return "", text, True
    name, _, problem = text.partition(": ")
    return name, problem, False


def _workflow_issue(exc: CoreMLOptError, workflow: Path) -> XcodeIssue:
    """The issue for an error while reading or running a workflow file, at its line where one is found."""
    message = f"{exc.input_name}: {exc.problem}; {exc.fix}"
    lines, bad = _read_lines(workflow)
    if bad is not None:
        return bad
    try:
        raw = yaml.safe_load(workflow.read_text(errors="replace"))
    except yaml.YAMLError:
        raw = None
    plan_file = workflow_plan_file(raw, workflow)
    name, source = exc.input_name, f"{workflow}: "
    if name == str(workflow):
        return XcodeIssue("error", f"{exc.problem}; {exc.fix}", workflow)
    if name.startswith(source):
        key = name[len(source):]
        path = tuple(re.findall(r"[^.\[\]]+", key))
        named = next((p for p in (str(plan_file), raw.get("plan")) if exc.problem.startswith(f"{p}: ")), None) \
            if plan_file is not None else None  # the plan file as load_workflow named it: absolute or as written
        if path == ("plan",) and named is not None:
            name, problem, whole = _split_nested(exc.problem[len(named) + 2:])
            found = _plan_file_issue(str(plan_file) if whole else name, problem, exc.fix, plan_file)
            if found is not None:
                return found
        elif path == ("plan",) and exc.problem.startswith(f"{source}plan: "):
            inner = exc.problem[len(f"{source}plan: "):]
            line = _plan_line(*_split_nested(inner), lines, ("plan",))
            if line is not None:
                return XcodeIssue("error", f"plan: {inner}; {exc.fix}", workflow, line)
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
        return XcodeIssue("error", f"{key}: {exc.problem}; {exc.fix}", workflow, line)
    if isinstance(raw, dict) and name == raw.get("model") and ("model",) in lines:  # the factory failed
        return XcodeIssue("error", message, workflow, lines[("model",)])
    if isinstance(exc, ModelError):
        return XcodeIssue("error", message)
    if plan_file is not None and plan_file.is_file():  # checked against the model: e.g. a layer matching nothing
        return _plan_file_issue(name, exc.problem, exc.fix, plan_file) or XcodeIssue("error", message)
    line = _plan_line(name, exc.problem, False, lines, ("plan",))
    return XcodeIssue("error", message, workflow if line is not None else None, line)


def issue_for_error(exc: CoreMLOptError, plan: str | os.PathLike | None = None, *,
                    workflow: str | os.PathLike | None = None) -> XcodeIssue:
    """An Xcode ``error:`` issue for ``exc``, pointing at the plan or workflow line at fault where one is found."""
    if workflow is not None and Path(workflow).is_file():
        return _workflow_issue(exc, Path(workflow).absolute())
    message = f"{exc.input_name}: {exc.problem}; {exc.fix}"
    if plan is None or isinstance(exc, ModelError) or not Path(plan).is_file():
        return XcodeIssue("error", message)
    return _plan_file_issue(exc.input_name, exc.problem, exc.fix, Path(plan).absolute()) or XcodeIssue("error", message)
