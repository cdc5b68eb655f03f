"""Xcode Run Script build phase: compress a model by a plan or a workflow, skip unchanged inputs, report issues.

``prepare`` (``-c plan.yaml``) and ``prepare_workflow`` (``-w workflow.yaml``) write a byte-reproducible
``.mlpackage`` and a stamp file beside it; when everything the output depends on is unchanged (and the
output is still what was written), they do nothing. Errors become the ``file:line: error:`` lines
Xcode's issue navigator shows (``xcode_issues``).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import yaml

from . import __version__
from .errors import CoreMLOptError, PlanError
from .xcode_issues import XcodeIssue, issue_for_error, workflow_plan_file, yaml_key_lines

__all__ = ["PrepArguments", "PrepResult", "StageFailed", "XcodeIssue", "declared_file_warnings",
           "input_fingerprint", "issue_for_error", "prepare", "prepare_workflow", "resolve_arguments", "stamp_path",
           "state_sha256", "tree_sha256", "work_dir", "workflow_fingerprint", "yaml_key_lines"]

logger = logging.getLogger(__name__)

STAMP_SUFFIX = ".coreml-opt-stamp.json"
WORK_SUFFIX = ".coreml-opt-work"
T = TypeVar("T")


class StageFailed(CoreMLOptError):
    """A workflow stage failed while preparing a build's model; named ``<workflow>: stages[i]``."""


@dataclass
class PrepResult:
    """What a prepare did: ``compressed`` (``report`` or ``workflow`` set) or ``up-to-date`` (nothing touched)."""

    output: Path
    status: Literal["compressed", "up-to-date"]
    stamp: Path
    report: Any = None  # CompressionReport when compressed by a plan
    warnings: list[XcodeIssue] = field(default_factory=list)
    workflow: Any = None  # WorkflowResult when a workflow ran
    stage: str | None = None  # the workflow stage whose package the output is


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


def work_dir(output: str | os.PathLike) -> Path:
    """The folder a workflow runs in, beside the output: hidden, kept for inspection (report.md, every stage)."""
    output = Path(output)
    return output.parent / f".{output.name}{WORK_SUFFIX}"


def _versions() -> dict[str, str]:
    return {"coreml_opt": __version__, "coremltools": metadata.version("coremltools")}


def input_fingerprint(model: str | os.PathLike, plan: str | os.PathLike) -> dict[str, str]:
    """Everything a plan's output depends on: model files, plan text, coreml-opt and coremltools versions."""
    return {"model_sha256": tree_sha256(model), "plan_sha256": hashlib.sha256(Path(plan).read_bytes()).hexdigest(),
            **_versions()}


def state_sha256(module: Any) -> str:
    """SHA-256 over a torch module's state_dict: each entry's name, dtype, shape and bytes, in order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _data_references(workflow: Any) -> list[str]:
    """The data a workflow reads by name or path: eval data, each stage's data, the auto-plan sweep's."""
    refs = [workflow.eval_data, *(s.options.get("data") for s in workflow.stages)]
    if workflow.auto_plan:
        refs.append(workflow.auto_plan["sensitivity"].get("data"))
    return sorted({r for r in refs if isinstance(r, str)})


def workflow_fingerprint(path: Path, workflow: Any, stage: str,
                         extra: Sequence[Path] = ()) -> dict[str, Any]:
    """Everything a workflow's output depends on: the workflow file, its plan file, the data folders and files
    it names (relative ones beside the workflow file, as the workflow reads them), the factory's model state and
    source file, the stage taken, ``extra`` files, and the coreml-opt, coremltools and torch versions."""
    from .model.convert import load_factory
    from .workflows.runner import BUILTIN_DATA

    inputs: dict[str, Any] = {"workflow_sha256": tree_sha256(path), "stage": stage}
    plan_file = workflow_plan_file(yaml.safe_load(path.read_text()), path)
    if plan_file is not None:
        inputs["plan_sha256"] = tree_sha256(plan_file)
    inputs["data"] = {ref: (tree_sha256(ref) if Path(ref).exists() else
                            "built-in" if ref in BUILTIN_DATA else "not a path") for ref in _data_references(workflow)}
    if isinstance(workflow.model, str):
        model = load_factory(workflow.model)
        inputs["model_state_sha256"] = state_sha256(model)
        module = inspect.getmodule(type(model))
        source = inspect.getsourcefile(module) if module is not None else None
        if source is not None:
            inputs["model_source_sha256"] = tree_sha256(source)
    inputs["extra"] = {str(p): tree_sha256(p) for p in extra}
    return {**inputs, **_versions(), "torch": metadata.version("torch")}


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stamped(output: Path, inputs: dict[str, Any], force: bool, build: Callable[[], T],
             record: dict[str, str]) -> T | None:
    """None when the stamp shows ``inputs`` and the output unchanged; else ``build()`` (which writes the output
    atomically) and a new stamp. A failing build raises and leaves the output and the stamp as they were."""
    stamp = stamp_path(output)
    previous = _read_stamp(stamp)
    if (not force and previous is not None and previous.get("inputs") == json.loads(json.dumps(inputs))
            and output.is_dir() and previous.get("output_sha256") == tree_sha256(output)):
        logger.info("%s is up to date: inputs unchanged since %s was written", output, stamp.name)
        return None
    from .model.package import atomic_output

    value = build()
    with atomic_output(stamp) as tmp:
        tmp.write_text(json.dumps({"inputs": inputs, "output_sha256": tree_sha256(output), **record},
                                  indent=2, sort_keys=True) + "\n")
    return value


def prepare(model: str | os.PathLike, plan: str | os.PathLike, output: str | os.PathLike, *,
            data: str | os.PathLike | None = None, force: bool = False,
            env: Mapping[str, str] | None = None) -> PrepResult:
    """Compress ``model`` by the plan file into ``output`` unless the stamp shows identical inputs and output.

    ``data`` (a folder, .npz or ``package.module:fn``) is the calibration data a plan with compensated specs
    (``+aw``, ``+gptq``, ``+bc``) needs, the data the plan was made on; a path is fingerprinted with the rest."""
    from .compress import missing_calibration_data, needs_statistics
    from .plan import Plan

    model, plan, output = (Path(p).absolute() for p in (model, plan, output))
    data_path = Path(data).absolute() if data is not None and Path(data).exists() else None
    declared = [model, plan, *([data_path] if data_path is not None else [])]
    warnings = declared_file_warnings(declared, output, env if env is not None else {})
    if not model.is_dir():
        from .model.package import load_package

        load_package(model, load_weights=False)  # raises the one-line ModelError for this input
    if not plan.is_file():
        raise PlanError(str(plan), "does not exist", "check the path of the plan file")
    if output.resolve() == model.resolve():
        raise PlanError(str(output), "is the input model", "write the compressed model to another path")
    loaded = Plan.load(plan)
    calibrated = needs_statistics(loaded)
    if calibrated and data is None:
        raise missing_calibration_data(str(plan))
    inputs: dict[str, Any] = input_fingerprint(model, plan)
    if calibrated:  # the statistics, so the compressed values, follow the data
        inputs["data"] = ({"path": str(data_path), "sha256": tree_sha256(data_path)} if data_path is not None
                          else {"name": str(data)})

    def build() -> Any:
        from .compress import calibration_statistics, compress

        logger.info("compressing %s by %s into %s", model, plan, output)
        statistics = calibration_statistics(model, data, specs=loaded._all_specs()) if calibrated else None
        return compress(model, loaded, output, statistics=statistics)  # atomic, single-threaded, reproducible

    report = _stamped(output, inputs, force, build, {"model": str(model), "plan": str(plan)})
    if report is None:
        return PrepResult(output, "up-to-date", stamp_path(output), warnings=warnings)
    if all(w.spec == "none" for w in report.weights):
        warnings.append(XcodeIssue("warning", f"{plan} compresses no weight of {model.name}; the output is a copy"))
    return PrepResult(output, "compressed", stamp_path(output), report, warnings)


def prepare_workflow(workflow: str | os.PathLike, output: str | os.PathLike, *, stage: str | None = None,
                     model: str | os.PathLike | None = None, force: bool = False,
                     env: Mapping[str, str] | None = None) -> PrepResult:
    """Run the workflow (through ``stage``, default the last) in ``work_dir(output)`` and copy that stage's
    package to ``output``, unless the stamp shows identical inputs and output. ``model``, if given, must not
    be an ``.mlpackage``: it is an extra input file (e.g. the factory's module), fingerprinted with the rest."""
    from .workflows import load_workflow, run_workflow

    workflow, output = Path(workflow).absolute(), Path(output).absolute()
    extra = [Path(model).absolute()] if model is not None else []
    if extra and (extra[0].suffix == ".mlpackage" or (extra[0] / "Manifest.json").is_file()):
        raise CoreMLOptError(str(extra[0]), "is an .mlpackage, but a workflow starts from the PyTorch factory "
                             "named by its `model:`", "drop MODEL with -w, or compress the package with -c plan.yaml")
    if extra and not extra[0].exists():
        raise CoreMLOptError(str(extra[0]), "does not exist", "check the path, or drop MODEL with -w")
    warnings = declared_file_warnings([workflow, *extra], output, env if env is not None else {})
    loaded = load_workflow(workflow)
    names = [s.name for s in loaded.stages]
    chosen = stage or names[-1]
    if chosen not in names:
        raise CoreMLOptError(f"--stage {chosen}", f"is not a stage of {workflow}", f"use one of {names}")
    index = names.index(chosen)
    work = work_dir(output)

    def build() -> Any:
        from .model.package import atomic_output, normalize_package

        shutil.rmtree(work, ignore_errors=True)  # the folder shows this run only
        loaded.stages = loaded.stages[:index + 1]  # later stages do not change this one's package
        logger.info("running %s through stage %s in %s", workflow, chosen, work)
        with _one_thread():
            result = run_workflow(loaded, out=work, progress=False)
        failed = result.failed
        if failed is not None:
            raise StageFailed(f"{workflow}: stages[{names.index(failed.name)}]", f"stage {failed.name} failed: "
                              f"{failed.error}", f"see {work / 'report.md'}; {output.name} was left as it was")
        with atomic_output(output) as tmp:
            shutil.copytree(result.stages[index].outcome.package, tmp)
            normalize_package(tmp)  # same inputs -> byte-identical package
        return result

    inputs = workflow_fingerprint(workflow, loaded, chosen, extra)
    result = _stamped(output, inputs, force, build, {"workflow": str(workflow), "work": str(work)})
    status = "up-to-date" if result is None else "compressed"
    return PrepResult(output, status, stamp_path(output), warnings=warnings, workflow=result, stage=chosen)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch and BLAS/OpenMP on one thread: calibration and fine-tuning sum in a thread-count dependent order,
    so without this a GPTQ or QAT package differs between machines with different core counts."""
    import torch

    from .determinism import single_threaded

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with single_threaded():
            yield
    finally:
        torch.set_num_threads(threads)


# ---- Xcode's environment ----------------------------------------------------------------------
class PrepArguments(NamedTuple):
    """The resolved arguments: ``plan`` or ``workflow`` (the other None); ``model`` may be None with a workflow."""

    model: str | None
    plan: str | None
    workflow: str | None
    output: str


def _script_files(env: Mapping[str, str], kind: str) -> list[str]:
    count = env.get(f"SCRIPT_{kind}_FILE_COUNT")
    indices = range(int(count)) if count and count.isdigit() else range(64)
    files = [env.get(f"SCRIPT_{kind}_FILE_{i}") for i in indices]
    return [f for f in files if f]


def _is_workflow_file(path: str) -> bool:
    """True for a YAML file holding a mapping with ``stages:`` (a workflow, not a plan)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" in data


def resolve_arguments(model: str | None, plan: str | None, output: str | None, env: Mapping[str, str], *,
                      workflow: str | None = None) -> PrepArguments:
    """Fill omitted arguments from a Run Script phase's files: a ``.yaml`` input with ``stages:`` as the
    workflow, else the ``.yaml`` input as the plan and the ``.mlpackage`` input as the model; output 0."""
    inputs = _script_files(env, "INPUT")
    outputs = _script_files(env, "OUTPUT")
    if plan is None and workflow is None:
        yamls = [f for f in inputs if f.endswith((".yaml", ".yml"))]
        workflow = next((f for f in yamls if _is_workflow_file(f)), None)
        plan = next(iter(yamls), None) if workflow is None else None
    if model is None and workflow is None:
        model = next((f for f in inputs if f.rstrip("/").endswith(".mlpackage")), None)
    if output is None and outputs:
        output = outputs[0]
    for value, what, fix in (
            (model or workflow, "MODEL", "pass it or list the .mlpackage under the phase's Input Files"),
            (plan or workflow, "plan (-c) or workflow (-w)",
             "pass -c plan.yaml or -w workflow.yaml, or list it under the phase's Input Files"),
            (output, "output (-o)", "pass -o OUT.mlpackage or list it under the phase's Output Files")):
        if value is None:
            raise CoreMLOptError(f"xcode-prep {what}", "was not given and no Xcode script file provides it", fix)
    return PrepArguments(model, plan, workflow, output)


def declared_file_warnings(inputs: Sequence[Path], output: Path, env: Mapping[str, str]) -> list[XcodeIssue]:
    """Inside Xcode, warn about inputs or outputs the phase does not declare (Xcode then skips or misorders it)."""
    if "SCRIPT_INPUT_FILE_COUNT" not in env and "SCRIPT_OUTPUT_FILE_COUNT" not in env:
        return []
    declared_in = {Path(f).absolute() for f in _script_files(env, "INPUT")}
    declared_out = {Path(f).absolute() for f in _script_files(env, "OUTPUT")}
    issues = [XcodeIssue("warning", f"{path} is not among the Run Script phase's Input Files; "
                                    f"Xcode will not rerun the phase when it changes")
              for path in inputs if path not in declared_in]
    if output not in declared_out:
        issues.append(XcodeIssue("warning", f"{output} is not among the Run Script phase's Output Files; "
                                            f"add it so Xcode orders and compiles it"))
    return issues
