"""Workflow files: a small YAML schema, validated up front with one-line errors naming the file and key.

```yaml
name: digits-pal2
model: coreml_opt.zoo:digits_cnn        # package.module:factory (Python API: an nn.Module too)
input_shape: [1, 1, 8, 8]
target: iOS18
plan: {global: pal2}                    # a plan mapping, a plan YAML path, or one spec string
eval: {data: digits-test, metric: accuracy}   # measure: true also scores each package with the package runtime
stages:
  - data_free: {}
  - calibration: {method: skm, data: ../calibration_data/digits}
  - finetune: {method: dkm, data: digits-train, epochs: 4, distill: {temperature: 2.0}}
out: ../out/digits-pal2                  # relative paths (plan, data, out) resolve beside this file
```
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..errors import CoreMLOptError, PlanError, SpecError
from ..plan import Plan
from ..targets import target_name
from ..yaml_files import data_beside, model_beside, path_beside, read_yaml_mapping

BUILTIN_DATA = ("digits-train", "digits-test")  # data names the runner resolves itself
STAGE_KINDS = ("data_free", "calibration", "finetune")
CALIBRATION_METHODS = ("skm", "gptq", "sparsegpt", "w8a8")
FINETUNE_METHODS = ("qat", "dkm", "prune")
_TOP_KEYS = {"name", "model", "input_shape", "target", "plan", "auto_plan", "eval", "stages", "out", "seed"}
_AUTO_PLAN_KEYS = {"sensitivity", "budget"}
_SWEEP_OPTIONS = {"data", "metric", "candidates", "weight_threshold", "batch_size", "kmeans"}
_BUDGET_KEYS = {"bpw", "size", "ratio", "max_drop"}
_EVAL_KEYS = {"data", "metric", "batch_size", "measure"}
_STAGE_KEYS = {
    "data_free": {"kmeans", "data"},  # data: calibration data for compensated specs (+aw, +bc)
    "calibration": {"method", "data", "samples", "batch_size", "layers"},
    "finetune": {"method", "data", "epochs", "batch_size", "lr", "distill", "train_step", "max_steps"},
}
_DISTILL_KEYS = {"temperature", "alpha"}


class WorkflowError(CoreMLOptError, ValueError):
    """An invalid workflow file: unknown key, bad value, missing field."""


@dataclass
class StageConfig:
    """One stage: its kind (data_free | calibration | finetune) and options."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        method = self.options.get("method")
        return f"{self.kind}-{method}" if method else self.kind


@dataclass
class Workflow:
    """A parsed, validated workflow: model, plan, evaluation and the stages to run."""

    name: str
    model: Any  # "package.module:factory" or an nn.Module
    input_shape: tuple[int, ...]
    plan: Plan
    stages: list[StageConfig]
    out: Path
    target: str = "iOS18"
    eval_data: Any = "digits-test"
    metric: Any = "accuracy"
    eval_batch_size: int = 512
    measure: bool = False  # eval.measure: also score each stage's package with the package runtime
    seed: int = 0
    source: str = "workflow"
    auto_plan: dict[str, Any] | None = None  # {"sensitivity": {...}, "budget": {...}}: plan from a sweep


def _fail(source: str, key: str, problem: str, fix: str) -> WorkflowError:
    return WorkflowError(f"{source}: {key}" if key else source, problem, fix)


def _data(value: Any, base: Path, source: str, key: str) -> Any:
    """A ``data:`` value resolved beside the workflow file (:func:`data_beside`); a path (or a ``file.py:fn``
    factory's file) that does not exist fails here, before any stage runs."""
    resolved = data_beside(value, base, BUILTIN_DATA)
    if isinstance(resolved, str) and resolved not in BUILTIN_DATA and os.path.isabs(resolved):
        head, sep, _ = resolved.rpartition(":")
        path = head if sep and head.endswith(".py") else resolved
        if not os.path.exists(path):
            raise _fail(source, key, f"{path} does not exist (relative paths resolve beside the workflow file)",
                        "fix the path, or name a built-in set (digits-train, digits-test) or package.module:fn")
    return resolved


def _check_keys(data: Any, allowed: set[str], source: str, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail(source, where, f"must be a mapping, got {type(data).__name__}", f"use keys {sorted(allowed)}")
    for key in data:
        if key not in allowed:
            raise _fail(source, f"{where}.{key}" if where else str(key), "is not a known key",
                        f"use one of {sorted(allowed)}")
    return dict(data)


def _positive_int(value: Any, source: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(source, key, f"must be a positive integer, got {value!r}", "e.g. 4")
    return value


def _flag(value: Any, source: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(source, key, f"must be true or false, got {value!r}", "e.g. true")
    return value


def _positive_number(value: Any, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _fail(source, key, f"must be a positive number, got {value!r}", "e.g. 2.0")
    return float(value)


def _parse_plan(value: Any, source: str, base: Path) -> Plan:
    try:
        if isinstance(value, Plan):
            return value
        if isinstance(value, dict):
            return Plan.from_dict(value, f"{source}: plan")
        if isinstance(value, str) and (value.endswith((".yaml", ".yml")) or os.sep in value):
            return Plan.load(path_beside(value, base))
        if isinstance(value, str):
            return Plan.from_spec(value)
    except (PlanError, SpecError) as exc:
        raise _fail(source, "plan", f"{exc.input_name}: {exc.problem}", exc.fix) from None
    raise _fail(source, "plan", "is missing or not a mapping, path or spec", "e.g. `plan: {global: pal4}`")


def _parse_auto_plan(value: Any, source: str, base: Path) -> dict[str, Any] | None:
    """``auto_plan: {sensitivity: {metric, data, candidates, ...}, budget: {bpw | size | ratio, max_drop}}``."""
    if value is None:
        return None
    value = _check_keys(value, _AUTO_PLAN_KEYS, source, "auto_plan")
    sweep = _check_keys(value.get("sensitivity") or {}, _SWEEP_OPTIONS, source, "auto_plan.sensitivity")
    if "data" in sweep:
        sweep["data"] = _data(sweep["data"], base, source, "auto_plan.sensitivity.data")
    budget = _check_keys(value.get("budget"), _BUDGET_KEYS, source, "auto_plan.budget")
    sizes = [k for k in ("bpw", "size", "ratio") if k in budget]
    if len(sizes) > 1 or not (sizes or "max_drop" in budget):
        raise _fail(source, "auto_plan.budget", "needs one of bpw, size, ratio (and/or max_drop)",
                    "e.g. `budget: {bpw: 3}` or `budget: {max_drop: 0.5}`")
    return {"sensitivity": dict(sweep), "budget": dict(budget)}


def _parse_stage(item: Any, index: int, source: str, base: Path) -> StageConfig:
    where = f"stages[{index}]"
    if not isinstance(item, dict) or len(item) != 1:
        raise _fail(source, where, "must be a one-key mapping such as `calibration: {method: skm}`",
                    f"use one of {list(STAGE_KINDS)}")
    kind, options = next(iter(item.items()))
    if kind not in STAGE_KINDS:
        raise _fail(source, f"{where}.{kind}", "is not a stage kind", f"use one of {list(STAGE_KINDS)}")
    options = _check_keys(options, _STAGE_KEYS[kind], source, f"{where}.{kind}")
    prefix = f"{where}.{kind}"
    method = options.get("method")
    if kind == "calibration" and method is not None and method not in CALIBRATION_METHODS:
        raise _fail(source, f"{prefix}.method", f"{method!r} is not a calibration method",
                    f"use one of {list(CALIBRATION_METHODS)}")
    if kind == "finetune" and method is not None and method not in FINETUNE_METHODS:
        raise _fail(source, f"{prefix}.method", f"{method!r} is not a fine-tuning method",
                    f"use one of {list(FINETUNE_METHODS)}")
    if kind in ("calibration", "finetune") and options.get("data") is None:
        raise _fail(source, f"{prefix}.data", "is missing", "name a calibration folder, an .npz, or digits-train")
    if "data" in options:
        options["data"] = _data(options["data"], base, source, f"{prefix}.data")
    for key in ("samples", "batch_size", "epochs", "max_steps"):
        if key in options:
            options[key] = _positive_int(options[key], source, f"{prefix}.{key}")
    if "lr" in options:
        options["lr"] = _positive_number(options["lr"], source, f"{prefix}.lr")
    if kind == "data_free" and options.get("kmeans", "exact") not in ("exact", "fast"):
        raise _fail(source, f"{prefix}.kmeans", f"{options['kmeans']!r} is not a k-means mode", "use exact or fast")
    if "distill" in options:
        distill = options["distill"]
        distill = {} if distill is True else distill
        distill = _check_keys(distill, _DISTILL_KEYS, source, f"{prefix}.distill")
        if "temperature" in distill:
            distill["temperature"] = _positive_number(distill["temperature"], source, f"{prefix}.distill.temperature")
        alpha = distill.get("alpha", 0.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise _fail(source, f"{prefix}.distill.alpha", f"must be in 0..1, got {alpha!r}",
                        "weight of the label loss, e.g. 0.5 (0 = soft targets only)")
        options["distill"] = distill
    if "layers" in options and not (isinstance(options["layers"], list)
                                    and all(isinstance(x, str) for x in options["layers"])):
        raise _fail(source, f"{prefix}.layers", "must be a list of module-name regexes", "e.g. ['features', 'classifier']")
    return StageConfig(kind, options)


def parse_workflow(data: Any, source: str = "workflow", base: Path | None = None) -> Workflow:
    """Validate a workflow mapping (the YAML document) into a :class:`Workflow`; relative paths in it (plan,
    data, out) resolve against ``base`` (the workflow file's folder; default the current directory)."""
    base = base or Path(".")
    data = _check_keys(data, _TOP_KEYS, source, "")
    auto_plan = _parse_auto_plan(data.get("auto_plan"), source, base)
    for key in ("model", "input_shape", "plan", "stages"):
        if data.get(key) is None and not (key == "plan" and auto_plan):
            raise _fail(source, key, "is missing", "see workflows/*.yaml for complete examples")
    model = model_beside(data["model"], base)  # a path/to/file.py:fn factory resolves beside the workflow
    if isinstance(model, str) and ":" not in model:
        raise _fail(source, "model", f"{model!r} is not package.module:factory", "e.g. coreml_opt.zoo:digits_cnn")
    shape = data["input_shape"]
    if not isinstance(shape, (list, tuple)) or not shape or any(
            isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise _fail(source, "input_shape", f"must be a list of positive integers, got {shape!r}", "e.g. [1, 1, 8, 8]")
    plan = _parse_plan(data["plan"], source, base) if data.get("plan") is not None else Plan()
    try:
        target = target_name(data.get("target") or plan.target or "iOS18")
    except SpecError as exc:
        raise _fail(source, "target", exc.problem, exc.fix) from None
    if plan.target is None:
        plan.target = target
    evaluation = _check_keys(data.get("eval"), _EVAL_KEYS, source, "eval")
    stages = data["stages"]
    if not isinstance(stages, list) or not stages:
        raise _fail(source, "stages", "must be a non-empty list", "e.g. `stages: [data_free: {}]`")
    parsed = [_parse_stage(item, i, source, base) for i, item in enumerate(stages)]
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise _fail(source, "stages", f"repeats a stage ({names})", "give each stage a different kind or method")
    name = str(data.get("name") or Path(source).stem)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(source, "seed", f"must be an integer, got {seed!r}", "e.g. 0")
    return Workflow(name=name, model=model, input_shape=tuple(shape), plan=plan, stages=parsed, auto_plan=auto_plan,
                    out=path_beside(data["out"], base) if data.get("out") else Path("out") / name, target=target,
                    eval_data=_data(evaluation.get("data", "digits-test"), base, source, "eval.data"),
                    metric=evaluation.get("metric", "accuracy"),
                    eval_batch_size=_positive_int(evaluation.get("batch_size", 512), source, "eval.batch_size"),
                    measure=_flag(evaluation.get("measure", False), source, "eval.measure"),
                    seed=seed, source=source)


def load_workflow(path: str | os.PathLike) -> Workflow:
    """Read and validate a workflow YAML file; relative paths in it (plan, data, out) resolve beside the file."""
    path = Path(path)
    data = read_yaml_mapping(path, WorkflowError, "workflow")
    return parse_workflow(data, str(path), path.parent)
