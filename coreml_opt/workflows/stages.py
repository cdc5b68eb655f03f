"""The three stage kinds: data-free (coremltools passes), calibration and fine-tuning (optimize.torch).

Every stage starts from the uncompressed BN-folded model with the same plan, writes one
``.mlpackage`` atomically, and measures the metric on the weights that package holds.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..errors import PlanError
from ..model.inventory import Inventory
from ..plan import Plan
from ..spec import Spec
from ..targets import target_rank
from .config import StageConfig
from .export import Exported, export_package, package_weights_model
from .torch_configs import build_config, check_method, default_method, verify_linear_quantizer
from .training import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What every stage shares: the plan, the models, the evaluation and the output folder."""

    plan: Plan
    specs: dict[str, Spec]  # planned module name -> spec
    reference: nn.Module  # uncompressed, BN-folded (fp32): starting point and teacher
    base_package: Path  # the uncompressed model converted (fp16)
    input_shape: tuple[int, ...]
    target: str
    evaluate: Callable[[nn.Module], float]
    load_data: Callable[[Any], Dataset]
    out: Path
    seed: int = 0
    progress: bool = True


@dataclass
class StageOutcome:
    """A finished stage: its package, inventory and metrics."""

    method: str
    package: Path
    inventory: Inventory
    metric: float  # measured on the package's own weights (W8A8: plus simulated activation quantization)
    torch_metric: Optional[float] = None  # the compressed torch model itself
    max_relative_diff: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    runtime_metric: Optional[float] = None  # the package itself, run by the package runtime (``--measure``)


# optimize.torch class behind each method, as named in errors.
COMPRESSOR_NAMES = {"skm": "SKMPalettizer", "dkm": "DKMPalettizer", "gptq": "GPTQ (LayerwiseCompressor)",
                    "sparsegpt": "SparseGPT (LayerwiseCompressor)", "qat": "LinearQuantizer",
                    "w8a8": "LinearQuantizer", "prune": "MagnitudePruner"}


def method_of(stage: StageConfig, specs: dict[str, Spec]) -> str:
    """The stage's method: as written, or the plan technique's default."""
    if stage.kind == "data_free":
        return "coremltools"
    return stage.options.get("method") or default_method(stage.kind, specs)


def check_stage(stage: StageConfig, ctx_specs: dict[str, Spec], target: str,
                bare: Optional[dict[str, Spec]] = None) -> None:
    """Refuse, before any work, a stage whose method cannot express the plan (``bare``: planned weights that
    are no module's ``.weight``, see ``bare_parameters``)."""
    if stage.kind == "data_free":
        return
    if bare:
        path, spec = next(iter(bare.items()))
        raise PlanError(f"layer {path!r} (spec {spec})", f"is a bare parameter, not a module's weight, so the "
                        f"{stage.name} stage (per-module optimize.torch configs) cannot compress it",
                        "skip it in the plan (skip: [...]) for this stage, or use the data_free stage")
    method = method_of(stage, ctx_specs)
    check_method(method, ctx_specs)
    if method == "w8a8" and target_rank(target) < 17:
        raise PlanError(f"stage {stage.name}", f"W8A8 needs iOS17 but the target is {target}", "set `target: iOS17`")


def run_stage(stage: StageConfig, ctx: StageContext) -> StageOutcome:
    """Run one stage and return its outcome (raises on failure)."""
    runner = {"data_free": _data_free, "calibration": _calibration, "finetune": _finetune}[stage.kind]
    torch.manual_seed(ctx.seed)
    return runner(stage, ctx, ctx.out / f"{stage.name}.mlpackage")


def _data_free(stage: StageConfig, ctx: StageContext, output: Path) -> StageOutcome:
    from ..compress import compress, missing_calibration_data, needs_statistics
    from ..simulate.calibration import needs_second_moments, package_statistics

    plan = dataclasses.replace(ctx.plan, kmeans=stage.options.get("kmeans", ctx.plan.kmeans))
    statistics = None
    if needs_statistics(plan):  # +aw/+gptq/+bc: statistics of the package's own layer inputs over the stage's data
        if "data" not in stage.options:
            raise missing_calibration_data(f"stage {stage.name}",
                                           "add `data:` (the data the plan was made on) to the data_free stage")
        data = ctx.load_data(stage.options["data"])
        statistics = package_statistics(ctx.base_package, [x for x, _ in data.batches(32)],
                                        second_moments=needs_second_moments(plan._all_specs()))
    report = compress(ctx.base_package, plan, output, statistics=statistics)
    model = package_weights_model(output, ctx.reference)
    notes = [f"left {name} in fp16, as coremltools would: {why}" for name, why in report.skipped.items()]
    return StageOutcome("coremltools", output, report.inventory_after, ctx.evaluate(model), notes=notes,
                        extra={"passes": report.passes, "bytes_predicted": report.bytes_predicted})


def _batches(data: Dataset, samples: int, batch_size: int) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    n = min(samples, len(data))
    return [(data.x[i:min(i + batch_size, n)], None if data.y is None else data.y[i:min(i + batch_size, n)])
            for i in range(0, n, batch_size)]


def _calibration(stage: StageConfig, ctx: StageContext, output: Path) -> StageOutcome:
    method = method_of(stage, ctx.specs)
    opts = stage.options
    data = ctx.load_data(opts["data"])
    batches = _batches(data, opts.get("samples", 128), opts.get("batch_size", 16))
    model = copy.deepcopy(ctx.reference).eval()
    config = build_config(method, ctx.specs, model, layers=opts.get("layers"))
    notes: list[str] = []
    if method == "skm":
        from coremltools.optimize.torch.palettization import SKMPalettizer

        config.calibration_nsamples = len(batches)
        reference = ctx.reference

        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc="calibration (sensitivity)", unit="batch", leave=False,
                   disable=not ctx.progress or not sys.stderr.isatty())

        def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
            x, y = batch
            if y is None:  # unlabeled: the uncompressed model's predictions are the targets
                with torch.no_grad():
                    y = reference(x).argmax(dim=1)
            bar.update(1)  # SKM computes one loss per calibration batch
            return F.cross_entropy(m(x), y)

        with bar:
            compressed = SKMPalettizer(model, config).compress(dataloader=batches, loss_fn=loss_fn)
    elif method in ("gptq", "sparsegpt"):
        from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor

        config.calibration_nsamples = len(batches)
        if config.layers == [""]:
            notes.append("model is not nn.Sequential: layers compressed from the uncompressed model's activations "
                         "(no error propagation between layers; set `layers:` to sequential blocks to enable it)")
        compressed = LayerwiseCompressor(model, config).compress([x for x, _ in batches], "cpu")
    elif method == "w8a8":
        from coremltools.optimize.torch.quantization import LinearQuantizer

        quantizer = LinearQuantizer(model, config)
        prepared = quantizer.prepare(example_inputs=(batches[0][0][:1],))
        verify_linear_quantizer(prepared, ctx.specs)
        prepared.eval()
        with torch.no_grad():
            for x, _ in batches:  # observers record activation ranges; no weight updates
                prepared(x)
        compressed = quantizer.finalize()
        notes.append("activation quantization is simulated in PyTorch (fake-quant with calibrated ranges); Core ML "
                     "cannot run on Linux to confirm it. The package's weights are checked against torch.")
    else:
        raise PlanError(f"method {method!r}", "is not a calibration method", "use skm, gptq, sparsegpt or w8a8")
    outcome = _finish(method, compressed, ctx, output, notes)
    outcome.extra["calibration_samples"] = sum(len(x) for x, _ in batches)
    return outcome


def _finetune(stage: StageConfig, ctx: StageContext, output: Path) -> StageOutcome:
    method = method_of(stage, ctx.specs)
    opts = stage.options
    data = ctx.load_data(opts["data"])
    distill = opts.get("distill")
    train_step = None
    if opts.get("train_step"):
        from ..metrics import import_metric_fn

        train_step = import_metric_fn(opts["train_step"])
    cfg = TrainConfig(epochs=opts.get("epochs", 2), batch_size=opts.get("batch_size", 64), lr=opts.get("lr", 1e-4),
                      max_steps=opts.get("max_steps"), train_step=train_step, seed=ctx.seed,
                      temperature=(distill.get("temperature", 2.0) if distill is not None else
                                   (2.0 if data.y is None and train_step is None else None)),
                      alpha=float((distill or {}).get("alpha", 0.0)))
    total = cfg.steps(len(data))
    model = copy.deepcopy(ctx.reference)
    # Pruning reaches its target sparsity by 70 % of the steps, then trains at it.
    ramp = max(1, int(0.7 * total))
    update_steps = sorted({int(i * ramp / 8) for i in range(9)})
    config = build_config(method, ctx.specs, model, update_steps=update_steps)
    if method == "qat":
        from coremltools.optimize.torch.quantization import LinearQuantizer

        compressor = LinearQuantizer(model, config)
        prepared = compressor.prepare(example_inputs=(data.x[:1],))
        verify_linear_quantizer(prepared, ctx.specs)
    elif method == "dkm":
        from coremltools.optimize.torch.palettization import DKMPalettizer

        compressor = DKMPalettizer(model, config)
        prepared = compressor.prepare()
    elif method == "prune":
        from coremltools.optimize.torch.pruning import MagnitudePruner

        compressor = MagnitudePruner(model, config)
        prepared = compressor.prepare()
    else:
        raise PlanError(f"method {method!r}", "is not a fine-tuning method", "use qat, dkm or prune")
    teacher = ctx.reference if cfg.temperature is not None else None
    stats = train(prepared, compressor, data, cfg, teacher=teacher, progress=ctx.progress)
    compressed = compressor.finalize()
    loss = "user train_step" if train_step else (f"distillation T={cfg.temperature:g}, alpha={cfg.alpha:g}"
                                                 if cfg.temperature is not None else "cross-entropy on labels")
    outcome = _finish(method, compressed, ctx, output, [f"{int(stats['steps'])} steps, {loss}"])
    outcome.extra.update(stats)
    return outcome


def _finish(method: str, compressed: nn.Module, ctx: StageContext, output: Path, notes: list[str]) -> StageOutcome:
    """Measure the torch model, export the package, measure the package's weights."""
    compressed.eval()
    check_finite_weights(method, compressed)
    torch_metric = ctx.evaluate(compressed)
    exported: Exported = export_package(compressed, ctx.reference, ctx.input_shape, ctx.target, output, ctx.specs,
                                        COMPRESSOR_NAMES.get(method, method))
    package_metric = ctx.evaluate(exported.package_model)
    outcome = StageOutcome(method, output, exported.inventory, package_metric, torch_metric,
                           exported.max_relative_diff, notes + exported.notes)
    if method == "w8a8":  # the headline metric includes the (simulated) activation quantization
        outcome.metric, outcome.extra["weights_only_metric"] = torch_metric, package_metric
    return outcome


def check_finite_weights(method: str, compressed: nn.Module) -> None:
    """Refuse a calibrated or fine-tuned model holding NaN/inf in any weight (a diverged run, a singular GPTQ
    Hessian) before it is evaluated or exported: its package would be silently wrong."""
    from ..nonfinite import nonfinite_tensors

    for name, bad, total in nonfinite_tensors(compressed):
        raise PlanError(f"stage {method}", f"left {bad} of {total} values of {name!r} NaN or inf",
                        "check the stage's data and options (e.g. a lower lr) or compress this layer data-free")
