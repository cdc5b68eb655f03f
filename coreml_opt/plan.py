"""Plans: a global spec, op-type overrides, per-layer overrides and skips, plus a deployment target.

A plan is the one file users edit and commit. ``resolve`` turns it into one spec per weight of a
concrete model and refuses invalid plans before any work (unknown layer names with suggestions,
specs the target cannot run, block or group sizes that do not divide a weight); ``to_coreml``
turns it into the ``OptimizationConfig`` passes coremltools runs.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import PlanError, SpecError
from .model.inventory import Inventory, WeightInfo
from .spec import CompensatedSpec, NoneSpec, Spec, parse_spec
from .storage import predicted_bytes
from .targets import target_rank
from .yaml_files import read_yaml_mapping

DEFAULT_WEIGHT_THRESHOLD = 2048
# Pass order for chained (joint or mixed) compression, and the coremltools function of each.
PASS_ORDER = (("prune", "prune_weights"), ("palettize", "palettize_weights"), ("quantize", "linear_quantize_weights"))
_PASS_OF_TECHNIQUE = {"prune": "prune", "palettize": "palettize", "quantize": "quantize", "lut": "quantize"}
_PLAN_KEYS = {"target", "weight_threshold", "global", "op_types", "layers", "skip", "kmeans"}
# Core ML (MIL) op types that read weights coremltools' compression passes configure under `op_types:`.
OP_TYPES = ("conv", "conv_transpose", "linear", "matmul", "einsum", "gather", "gather_nd", "gather_along_axis",
            "lstm", "gru", "rnn", "batch_norm", "instance_norm", "layer_norm", "scaled_dot_product_attention",
            "add", "sub", "mul", "real_div")


@dataclass(frozen=True)
class CoreMLPass:
    """One coremltools compression pass: function name, its config, and whether it chains."""

    function: str  # "prune_weights" | "palettize_weights" | "linear_quantize_weights"
    config: Any  # coremltools.optimize.coreml.OptimizationConfig
    joint_compression: bool = False

    def apply(self, mlmodel):
        """Run this pass on ``mlmodel`` and return the compressed model."""
        import coremltools.optimize.coreml as cto

        from .determinism import single_threaded

        with single_threaded():  # palettes independent of the core count, like the simulation's
            return getattr(cto, self.function)(mlmodel, self.config, joint_compression=self.joint_compression)


@dataclass
class Plan:
    """Compression choices for a model; ``None`` global means compress only what is named."""

    global_spec: Spec | None = None
    op_types: dict[str, Spec] = field(default_factory=dict)
    layers: dict[str, Spec] = field(default_factory=dict)  # NoneSpec = explicit skip
    target: str | None = None  # None: the model's own deployment target
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD
    kmeans: str = "exact"  # "fast": emit palettes from the simulation engine's fast k-means
    # Where ``target`` came from, for error fixes: "target:" (plan YAML) or the option that set it ("--target").
    target_origin: str = field(default="target:", compare=False, repr=False)
    global_origin: str = field(default="global", compare=False, repr=False)  # or "--spec int4" from the CLI

    def __post_init__(self) -> None:
        if self.target is not None:
            target_rank(self.target)
        if not isinstance(self.weight_threshold, int) or self.weight_threshold < 0:
            raise PlanError(f"weight_threshold {self.weight_threshold!r}", "must be a non-negative integer",
                            "use e.g. 2048 (coremltools' default)")
        if self.kmeans not in ("exact", "fast"):
            raise PlanError(f"kmeans {self.kmeans!r}", "is not a k-means mode", "use exact or fast")
        for op_type in self.op_types:
            check_op_type(op_type, f"op_types.{op_type}")

    # ---- construction and YAML -------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str | Spec, target: str | None = None, **kwargs: Any) -> "Plan":
        """A plan that applies one spec to every weight above the threshold."""
        return cls(global_spec=parse_spec(spec), target=target, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plan") -> "Plan":
        """Build a plan from its YAML mapping (see ``to_dict``)."""
        if not isinstance(data, dict):
            raise PlanError(source, "is not a mapping of plan fields", "start from `coreml-opt plan --example`")
        unknown = set(data) - _PLAN_KEYS
        if unknown:
            raise PlanError(source, f"has unknown field(s) {sorted(unknown)}", f"use only {sorted(_PLAN_KEYS)}")

        def specs(section: str) -> dict[str, Spec]:
            entries = data.get(section) or {}
            if not isinstance(entries, dict):
                raise PlanError(f"{source}: {section}", "must be a mapping of name: spec", "e.g. `conv: pal4`")
            if section == "op_types":
                for key in entries:
                    check_op_type(key, f"{source}: {section}.{key}")
            return {str(k): _parse_in(v, f"{source}: {section}.{k}") for k, v in entries.items()}

        layers = specs("layers")
        skip = data.get("skip") or []
        if not isinstance(skip, list):
            raise PlanError(f"{source}: skip", "must be a list of layer names", "e.g. `skip: [classifier.2]`")
        layers.update({str(name): NoneSpec() for name in skip})
        glob = data.get("global")
        return cls(global_spec=_parse_in(glob, f"{source}: global") if glob not in (None, "") else None,
                   op_types=specs("op_types"), layers=layers, target=data.get("target"),
                   weight_threshold=data.get("weight_threshold", DEFAULT_WEIGHT_THRESHOLD),
                   kmeans=data.get("kmeans", "exact"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan YAML file, with one-line errors for missing or malformed files."""
        data = read_yaml_mapping(path, PlanError, "plan")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping; ``Plan.from_dict(plan.to_dict()) == plan``."""
        out: dict[str, Any] = {}
        if self.target is not None:
            out["target"] = self.target
        if self.weight_threshold != DEFAULT_WEIGHT_THRESHOLD:
            out["weight_threshold"] = self.weight_threshold
        if self.kmeans != "exact":
            out["kmeans"] = self.kmeans
        if self.global_spec is not None:
            out["global"] = str(self.global_spec)
        if self.op_types:
            out["op_types"] = {k: str(v) for k, v in self.op_types.items()}
        layers = {k: str(v) for k, v in self.layers.items() if not v.is_none}
        if layers:
            out["layers"] = layers
        skip = [k for k, v in self.layers.items() if v.is_none]
        if skip:
            out["skip"] = skip
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan YAML atomically."""
        from .model.package import atomic_output

        with atomic_output(path) as tmp:
            tmp.write_text(self.to_yaml())
        return Path(path)

    # ---- resolution against a model -----------------------------------------------------------
    def effective_target(self, inventory: Inventory) -> int:
        return target_rank(self.target) if self.target is not None else inventory.deployment_target

    def resolve(self, inventory: Inventory) -> dict[str, Spec]:
        """One spec per weight (by Core ML const name); raises PlanError for any invalid choice. A weight a
        global or op-type spec cannot fit by shape maps to fp16 (see ``shape_skips``)."""
        return self.resolve_with_skips(inventory)[0]

    def resolve_with_skips(self, inventory: Inventory) -> tuple[dict[str, Spec], dict[str, str]]:
        """``resolve`` plus {weight: reason} for the weights a global or op-type spec cannot fit by shape
        (group/block size not dividing a dim, ...): left in fp16, as coremltools skips them with a warning.
        A spec named under ``layers:`` that does not fit, or a spec that fits no weight at all, is refused."""
        index = _name_index(inventory)
        named: dict[str, tuple[str, Spec]] = {}
        for key, spec in self.layers.items():
            weight = index.get(key)
            if weight is None:
                raise PlanError(f"layer {key!r}", "matches no weight in the model",
                                f"did you mean {_suggest(key, index)}? (`coreml-opt inspect MODEL` lists names)")
            if weight in named and named[weight][1] != spec:
                raise PlanError(f"layer {key!r}", f"names the same weight as {named[weight][0]!r} with another spec",
                                "keep one entry per weight")
            named[weight] = (key, spec)
        target = self.effective_target(inventory)
        resolved: dict[str, Spec] = {}
        skipped: dict[str, str] = {}
        first: PlanError | None = None
        for w in inventory.weights:
            if w.name in named:
                key, spec = named[w.name]
            else:
                key, spec = self._default_for(w)
            try:
                self._check(w, key, spec, target, inventory)
            except _ShapeProblem as exc:
                if w.name in named:
                    raise exc.error from None
                first = first or exc.error
                skipped[w.name] = f"{spec}: {exc.problem}"
                spec = NoneSpec()
            resolved[w.name] = spec
        if first is not None and all(s.is_none for s in resolved.values()):
            raise first  # the spec fits none of the weights: a mistake, not a few odd layers
        return resolved, skipped

    def named_weights(self, inventory: Inventory) -> set[str]:
        """Const names of the weights this plan names under ``layers:``/``skip:`` (a per-layer choice)."""
        index = _name_index(inventory)
        return {index[key] for key in self.layers if key in index}

    def _default_for(self, w: WeightInfo) -> tuple[str, Spec]:
        """Op-type then global spec; like coremltools, both apply only above the weight threshold."""
        if w.params <= self.weight_threshold:
            return "below weight_threshold", NoneSpec()
        specs = {(t, self.op_types[t]) for t, _ in w.consumers if t in self.op_types}
        if len({s for _, s in specs}) > 1:
            raise PlanError(f"weight {w.name!r}", f"is shared by ops with different specs {sorted(map(str, dict(specs).values()))}",
                            "name the weight under `layers:` to give it one spec (tied weights need one config)")
        if specs:
            op_type, spec = next(iter(specs))
            return f"op_types.{op_type}", spec
        if self.global_spec is not None:
            return "global", self.global_spec
        return "default", NoneSpec()

    def _check(self, w: WeightInfo, key: str, spec: Spec, target: int, inventory: Inventory) -> None:
        if spec.is_none:
            return
        where = f"{self.global_origin if key == 'global' else key} ({w.name}, shape {list(w.shape)})"
        if spec.min_target > target and self.target is not None:  # None: the model's target, checked below
            fix = (f"pass {self.target_origin} iOS{spec.min_target}" if self.target_origin.startswith("-")
                   else f"set `{self.target_origin} iOS{spec.min_target}` in the plan")
            raise PlanError(where, f"spec {spec} needs iOS{spec.min_target} but the target is iOS{target}",
                            f"{fix}, or pick a spec that runs on iOS{target} (e.g. int8, pal4)")
        if spec.min_target > inventory.deployment_target:
            raise PlanError(where, f"spec {spec} needs iOS{spec.min_target} but the model was converted for "
                            f"iOS{inventory.deployment_target}",
                            f"reconvert with `coreml-opt convert --target iOS{spec.min_target}`")
        if w.is_compressed:
            raise PlanError(where, f"is already compressed ({w.compression})", "start from the uncompressed model")
        problem = spec.shape_problem(w.shape, w.reader_type)
        if problem:
            from_option = key == "global" and self.global_origin.startswith("-")
            raise _ShapeProblem(problem, PlanError(
                where, f"spec {spec} cannot compress it: {problem}",
                "pick a spec that fits the weights, or write a plan (-c) to override this layer under `layers:`"
                if from_option else "override this layer under `layers:` with a spec that fits it, or skip it"))

    def predicted_bytes(self, inventory: Inventory, weight_values: Callable[[str], Any] | None = None,
                        resolved: dict[str, Spec] | None = None) -> dict[str, int]:
        """Bytes each weight will take in the saved package under this plan.

        ``weight_values(name)`` gives a weight's values, making data-dependent counts exact
        (non-zeros after pruning, unique values); without it they are estimated from the spec.
        ``resolved`` is this plan's ``resolve(inventory)`` when the caller already has it."""
        resolved = resolved if resolved is not None else self.resolve(inventory)
        ios18 = inventory.deployment_target >= 18
        out = {}
        for w in inventory.weights:
            spec = resolved[w.name]
            values = weight_values(w.name) if weight_values is not None and is_data_dependent(spec) else None
            out[w.name] = predicted_bytes(spec, w.shape, w.reader_type, ios18_ops=ios18, weight=values,
                                          precision=w.dtype)
        return out

    # ---- coremltools configs ------------------------------------------------------------------
    def single_technique(self) -> str | None:
        """The one technique every spec of this plan uses, or None when mixed or joint."""
        kinds = {s.technique for s in self._all_specs() if not s.is_none}
        return next(iter(kinds)) if len(kinds) == 1 and kinds <= {"quantize", "palettize", "prune"} else None

    def _all_specs(self) -> list[Spec]:
        return [s for s in [self.global_spec, *self.op_types.values(), *self.layers.values()] if s is not None]

    def to_coreml(self, inventory: Inventory, lut_function: Callable[[Spec], Callable] | None = None,
                  resolved: dict[str, Spec] | None = None) -> list[CoreMLPass]:
        """The coremltools passes, in order, that apply this plan to the model of ``inventory``."""
        import coremltools.optimize.coreml as cto

        resolved = resolved if resolved is not None else self.resolve(inventory)  # validates
        technique = self.single_technique()
        if technique is not None and lut_function is None:
            return [CoreMLPass(dict(PASS_ORDER)[technique], self._mirrored_config(inventory, resolved))]
        consumers = {w.name: [op_name for _, op_name in w.consumers] for w in inventory.weights}
        passes: list[CoreMLPass] = []
        for stage, function in PASS_ORDER:
            configs: dict[str, Any] = {}
            joint = False
            for name, spec in resolved.items():
                for position, part in enumerate(spec.parts):
                    if not part.is_none and _PASS_OF_TECHNIQUE[part.technique] == stage:
                        config = _op_config(part, 0, lut_function)
                        if position == 0:
                            # Keyed by the const, which coremltools looks up first: a config keyed by the
                            # reading op would also reach every other const of that op, and one shared with
                            # an op configured otherwise (equal biases, deduplicated) is a config conflict.
                            configs[name] = config
                        else:
                            # A joint spec's later part: the earlier pass renamed the const, and coremltools
                            # then looks the config up by the op reading the weight.
                            configs.update({op_name: config for op_name in consumers[name]})
                        joint = joint or position > 0  # a joint spec's later part (also under +bc)
            if configs:
                passes.append(CoreMLPass(function, cto.OptimizationConfig(op_name_configs=configs), joint))
        return passes

    def _mirrored_config(self, inventory: Inventory, resolved: dict[str, Spec]):
        """A single-technique OptimizationConfig with the plan's own global/op-type/layer structure.

        A weight read by several ops (tied embeddings, a conv and a conv_transpose) is named by its
        const, which coremltools looks up first: its readers' op-type configs could otherwise differ
        ("compression config conflict"). ``resolved`` is ``resolve(inventory)`` (one spec per weight)."""
        import coremltools.optimize.coreml as cto

        index = _name_index(inventory)  # callers have validated the plan with resolve()
        names = {index[k]: s.coreml_config(0) for k, s in self.layers.items()}
        for w in inventory.weights:  # shared weights, and weights a caller took out of a global/op-type spec
            spec = resolved[w.name]
            if len(w.consumers) > 1 or (spec.is_none and w.params > self.weight_threshold):
                names[w.name] = None if spec.is_none else spec.coreml_config(0)
        return cto.OptimizationConfig(
            global_config=self.global_spec.coreml_config(self.weight_threshold)
            if self.global_spec is not None else None,
            op_type_configs={t: s.coreml_config(self.weight_threshold) for t, s in self.op_types.items()},
            op_name_configs=names,
        )

    def coreml_yaml(self, inventory: Inventory) -> str:
        """The plan as an ``OptimizationConfig.from_yaml`` document (single-technique plans only)."""
        if self.single_technique() is None:
            raise PlanError("plan", "mixes techniques or uses joint specs, which is a sequence of passes",
                            "export each pass with to_coreml(), or use a single-technique plan")
        compensated = [str(s) for s in self._all_specs() if isinstance(s, CompensatedSpec)]
        if compensated:
            raise PlanError(f"spec {compensated[0]}", "compensates from calibration data (biases, LUTs chosen by input "
                            "statistics), which no OptimizationConfig can express",
                            "compress with coreml-opt (compress --data), or drop +aw/+gptq/+bc")
        resolved = self.resolve(inventory)  # refuse an invalid plan before exporting it
        return yaml.safe_dump(optimization_config_dict(self._mirrored_config(inventory, resolved)), sort_keys=False)


class _ShapeProblem(Exception):
    """A spec that cannot compress a weight of this shape: ``problem`` (why) and the ``error`` to raise."""

    def __init__(self, problem: str, error: PlanError) -> None:
        super().__init__(problem)
        self.problem, self.error = problem, error


def is_data_dependent(spec: Spec) -> bool:
    """Whether the stored size depends on the values (pruning non-zeros, unique palettes)."""
    return any(part.technique == "prune" or getattr(part, "mode", "") == "unique" for part in spec.parts)


def _op_config(spec: Spec, weight_threshold: int, lut_function: Callable[[Spec], Callable] | None) -> Any:
    if lut_function is not None and spec.technique == "palettize" and getattr(spec, "mode", "") == "kmeans":
        return spec.coreml_config(weight_threshold, lut_function=lut_function(spec))
    return spec.coreml_config(weight_threshold)


def optimization_config_dict(config) -> dict[str, Any]:
    """An OptimizationConfig as the nested dict ``OptimizationConfig.from_dict`` reads."""
    import attrs

    def entry(op_config, default_type: str | None) -> dict[str, Any] | None:
        if op_config is None:
            return None
        values = {k: v for k, v in attrs.asdict(op_config).items() if v is not None and k != "lut_function"}
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        values = {k: _plain(v) for k, v in values.items()}
        if type(op_config).__name__ != default_type:
            values["config_type"] = type(op_config).__name__
        return values

    all_configs = [config.global_config, *config.op_type_configs.values(), *config.op_name_configs.values()]
    first = next((c for c in all_configs if c is not None), None)
    default_type = type(first).__name__ if first is not None else "OpLinearQuantizerConfig"
    return {
        "config_type": default_type,
        "global_config": entry(config.global_config, default_type),
        "op_type_configs": {k: entry(v, default_type) for k, v in config.op_type_configs.items()},
        "op_name_configs": {k: entry(v, default_type) for k, v in config.op_name_configs.items()},
    }


def _plain(value: Any) -> Any:
    """A YAML-safe value: enums become their lower-case names, numpy and MIL dtypes their names (``int8``)."""
    import enum

    import numpy as np
    from coremltools.converters.mil.mil import types

    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, type) and types.is_builtin(value):  # MIL types all have __name__ "int"/"fp"
        return types.builtin_to_string(value)
    if isinstance(value, type):
        return np.dtype(value).name if issubclass(value, np.generic) else value.__name__
    if isinstance(value, np.dtype):
        return value.name
    return value


def check_op_type(op_type: Any, where: str) -> None:
    """Refuse an ``op_types:`` key that is not a Core ML op type (e.g. the PyTorch class name ``Linear``),
    which coremltools would silently never match."""
    if op_type in OP_TYPES:
        return
    close = difflib.get_close_matches(str(op_type).lower(), OP_TYPES, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise PlanError(where, "is not a Core ML op type", f"{hint}use one of {', '.join(OP_TYPES)} "
                    "(`coreml-opt inspect MODEL` shows each weight's op type)")


def _parse_in(value: Any, where: str) -> Spec:
    try:
        return parse_spec(str(value) if value is not None else "none")
    except SpecError as exc:
        raise PlanError(where, f"{exc.problem} ({value!r})", exc.fix) from None


def _name_index(inventory: Inventory) -> dict[str, str]:
    """Every name a plan may use for a weight -> the weight's Core ML const name."""
    index: dict[str, str] = {}
    for w in inventory.weights:
        index[w.name] = w.name
        index[w.var] = w.name
        for _, op_name in w.consumers:
            index.setdefault(op_name, w.name)
        if w.torch_name:
            index[w.torch_name] = w.name
            module, _, leaf = w.torch_name.rpartition(".")
            if module and leaf == "weight":
                index.setdefault(module, w.name)
    return index


def _suggest(key: str, index: dict[str, str]) -> str:
    close = difflib.get_close_matches(key, list(index), n=3, cutoff=0.4)
    return ", ".join(repr(c) for c in close) if close else "one of " + ", ".join(repr(k) for k in list(index)[:5])


def load_plan(source: str | os.PathLike | Plan | None = None, *, spec: str | None = None,
              target: str | None = None, target_origin: str = "--target") -> Plan:
    """A plan from a YAML path, a spec string, or a Plan; ``target`` overrides the plan's target (errors name
    ``target_origin`` as where to change it)."""
    if isinstance(source, Plan):
        plan = source
    elif source is not None:
        plan = Plan.load(source)
    elif spec is not None:
        plan = Plan.from_spec(spec)
        plan.global_origin = f"--spec {spec}"
    else:
        raise PlanError("plan", "no plan or spec given", "pass -c plan.yaml or --spec int8")
    if target is not None:
        target_rank(target)
        plan.target = target
        plan.target_origin = target_origin
    return plan


