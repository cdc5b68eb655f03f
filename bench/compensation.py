"""Benchmark: error compensation (``+bc`` bias correction, ``+aw`` activation-aware LUTs) on pretrained
EfficientNet-Lite0, statistics from the plan half of the photos, figures on the report half.

Prints (1) whole-model uniform specs with and without each compensation: top-1 agreement and KL
against the fp32 model; (2) single-layer KL of each candidate next to the plain one on a sample of
layers; (3) the BN lead: per-tensor pal4 of the BN-folded weights vs of the unfolded weights (BN's
per-output-channel scale applied after the LUT). Last line: one JSON object. Asserts nothing.

    python bench/compensation.py [--n 64] [--layers 8] [--whole pal4,pal4+bc,...]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import copy
import json
import logging
import time

import torch
from torch import nn

from coreml_opt.metrics import kl_divergence, top1_agreement
from coreml_opt.model.fold import fold_batchnorm
from coreml_opt.photos import photo_halves
from coreml_opt.simulate import apply_plan, collect_statistics, using_statistics
from coreml_opt.zoo import efficientnet_lite0

WHOLE = "pal4,pal4+bc,pal4+aw,pal4+aw+bc,pal4/pcs,pal4/pcs+aw+bc,pal4/g16,pal4/g16+aw+bc,int4/block32,int4/block32+bc"
SINGLE = "pal2,pal2+bc,pal2+aw,pal2+aw+bc,pal4,pal4+aw+bc"


def _run(model: nn.Module, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def _weights(model: nn.Module, threshold: int = 2048) -> list[str]:
    """Conv/linear weight paths above coremltools' default threshold (what a global spec compresses)."""
    return [f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.numel() > threshold]


def _fits(spec: str, model: nn.Module, path: str) -> bool:
    from coreml_opt.spec import parse_spec
    from coreml_opt.simulate.apply import weight_readers

    param = model.get_parameter(path)
    return parse_spec(spec).shape_problem(tuple(param.shape), weight_readers(model, param)) is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="photos (half for statistics, half for the figures)")
    parser.add_argument("--layers", type=int, default=8, help="layers sampled for the single-layer table")
    parser.add_argument("--whole", default=WHOLE, help="comma-separated uniform specs for the whole-model table")
    parser.add_argument("--single", default=SINGLE, help="comma-separated specs for the single-layer table")
    parser.add_argument("--no-bn", action="store_true", help="skip the BN lead (unfolded vs folded LUTs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    start = time.time()
    original = efficientnet_lite0()
    plan_half, report_half = photo_halves(args.n)
    folded = fold_batchnorm(original, (plan_half.x[:1],))
    reference = _run(folded, report_half.x)
    stats = collect_statistics(folded, [plan_half.x[i:i + 16] for i in range(0, len(plan_half.x), 16)])
    paths = _weights(folded)
    out: dict = {"n_plan": len(plan_half.x), "n_report": len(report_half.x), "layers": len(paths)}

    def measure(model: nn.Module, assignments: dict[str, str]) -> tuple[float, float]:
        with using_statistics(stats), apply_plan(model, assignments):
            logits = _run(model, report_half.x)
        return top1_agreement(logits, reference), kl_divergence(logits, reference)

    print(f"EfficientNet-Lite0, {len(paths)} weights, statistics on {len(plan_half.x)} plan photos, "
          f"figures on {len(report_half.x)} report photos\n")
    print(f"{'uniform spec (whole model)':28s} {'agreement':>9s} {'KL':>8s} {'fit':>5s}")
    whole = {}
    for spec in [s for s in args.whole.split(",") if s]:
        fit = [p for p in paths if _fits(spec, folded, p)]
        agreement, kl = measure(folded, {p: spec for p in fit})
        whole[spec] = {"agreement": agreement, "kl": kl, "layers": len(fit)}
        print(f"{spec:28s} {agreement:9.3f} {kl:8.4f} {len(fit):5d}", flush=True)
    out["whole"] = whole

    singles = [s for s in args.single.split(",") if s]
    kinds: dict[str, list[str]] = {}
    for path in paths:
        module = folded.get_submodule(path.rpartition(".")[0])
        kind = ("linear" if isinstance(module, nn.Linear) else "depthwise conv" if module.groups > 1
                else "conv 1x1" if module.kernel_size == (1, 1) else "conv")
        kinds.setdefault(kind, []).append(path)
    sample = []
    for kind, members in kinds.items():  # up to --layers per kind, evenly spaced through the network
        step = max(1, len(members) // max(1, args.layers))
        sample += members[::step][: args.layers]
    print(f"\nsingle-layer KL (x1e3), {len(sample)} layers")
    print(f"{'layer':40s} " + " ".join(f"{s:>11s}" for s in singles))
    single = {}
    for path in sample:
        row = {}
        for spec in singles:
            row[spec] = measure(folded, {path: spec})[1] if _fits(spec, folded, path) else None
        single[path] = row
        print(f"{path:40s} " + " ".join(f"{1e3 * v:11.3f}" if v is not None else f"{'-':>11s}" for v in row.values()),
              flush=True)
    out["single"] = single
    totals = {s: sum(r[s] for r in single.values() if r[s] is not None) for s in singles}
    for kind, members in kinds.items():
        rows = [single[p] for p in sample if p in members]
        if rows:
            print(f"{'sum ' + kind + f' ({len(rows)})':40s} " + " ".join(
                f"{1e3 * sum(r[s] for r in rows if r[s] is not None):11.3f}" for s in singles))
    print(f"{'sum':40s} " + " ".join(f"{1e3 * v:11.3f}" for v in totals.values()))
    out["single_sum"] = totals

    if args.no_bn:
        out["wall_s"] = round(time.time() - start, 1)
        print(json.dumps(out))
        return
    # The BN lead: palettize the unfolded conv weights (per-tensor k-means), then fold BN's scale in.
    unfolded = copy.deepcopy(original)
    bn_paths = [p for p in _weights(unfolded)]
    with apply_plan(unfolded, {p: "pal4" for p in bn_paths}):
        refolded = fold_batchnorm(unfolded, (plan_half.x[:1],))
    agreement_u, kl_u = measure(refolded, {})
    print(f"\nBN lead, pal4 per tensor: folded {whole.get('pal4', {}).get('agreement', float('nan')):.3f} agreement "
          f"(KL {whole.get('pal4', {}).get('kl', float('nan')):.4f}); unfolded then folded {agreement_u:.3f} "
          f"(KL {kl_u:.4f}) [the latter's scale is not fp16-rounded]")
    out["bn_lead"] = {"unfolded_pal4": {"agreement": agreement_u, "kl": kl_u}}
    out["wall_s"] = round(time.time() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
