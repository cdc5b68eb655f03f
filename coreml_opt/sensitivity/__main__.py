"""``python -m coreml_opt.sensitivity``: rank layers by accuracy drop; flags or one sweep YAML file."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..cli import parse_shape, quiet_coremltools
from ..errors import CoreMLOptError, DataError

EPILOG = """examples:
  python -m coreml_opt.sensitivity --model coreml_opt.zoo:digits_cnn --input-shape 1,1,8,8 \\
      --data coreml_opt.sensitivity.examples:digits_heldout --metric accuracy --out sensitivity_out/digits
  python -m coreml_opt.sensitivity --model coreml_opt.zoo:digits_cnn --input-shape 1,1,8,8 \\
      --data calibration_data/digits --metric kl --candidates int8,pal4,pal2 --target iOS16 --out out/kl
  python -m coreml_opt.sensitivity sensitivity/digits.yaml
  python -m coreml_opt.sensitivity --model digits.mlpackage --data calibration_data/digits --metric kl --out out/pkg

A sweep file is YAML with the same fields as the options (model, input_shape, data, metric,
candidates, target, out, max_trials, time_budget, weight_threshold, all_layers, batch_size, kmeans,
reference, groups, executor, address, memory, device); `groups:` is role, block or layer, or a mapping of group
name -> list of glob patterns over layer names (e.g. `groups: {q: ['blocks.*.attn.q.weight']}`; unmatched layers
stay groups of one);
relative data, out and .mlpackage model paths in it resolve beside the file, not the current directory;
options given on the command line override the file's fields (e.g. `--out elsewhere`).
A model given as an .mlpackage is swept with the package runtime (no --input-shape: the package declares it);
proxy metrics then compare against the uncompressed package, or against --reference PKG_OR_FACTORY.
Rerunning a sweep resumes it: trials already in DIR/sensitivity.sqlite are not run again.
--executor ray --address HOST:PORT runs the trials on a Ray cluster (pip install -e ".[ray]"): each worker loads
the model and data by name, the rows go to the same store, so a sweep resumes locally or on the cluster.
drop = how much worse than the fp16 baseline (for kl, lower is better, so drop = kl - baseline).
"""
SWEEP_KEYS = {"model", "input_shape", "input", "data", "metric", "candidates", "target", "out", "max_trials",
              "time_budget", "weight_threshold", "all_layers", "batch_size", "kmeans", "reference", "groups",
              "executor", "address", "memory", "device"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coreml_opt.sensitivity", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Compress one layer at a time (simulated exactly as coremltools would) "
                                            "and rank layers by the metric drop.")
    p.add_argument("sweep", nargs="?", help="sweep YAML file (e.g. sensitivity/digits.yaml) instead of the options")
    p.add_argument("--model", help="PyTorch model factory package.module:factory, e.g. coreml_opt.zoo:digits_cnn, "
                                   "or an ML Program package, e.g. digits.mlpackage (run by the package runtime)")
    p.add_argument("--input-shape", type=parse_shape, help="example input shape, e.g. 1,1,8,8")
    p.add_argument("--input", metavar="NAME:SHAPE[:DTYPE]",
                   help="the model's input with its dtype instead of --input-shape, e.g. ids:1,16:int32 for token "
                        "ids (data-free inputs are then ids below the embedding's vocabulary)")
    p.add_argument("--data", help="evaluation data: calibration folder, .npz (x, y) or package.module:fn "
                                  "returning data, e.g. calibration_data/digits; omitted: seeded random inputs")
    p.add_argument("--metric", default="top1", help="accuracy (needs labels), psnr, sqnr, kl, top1, cosine "
                                                    "or package.module:fn (model -> float, higher is better); "
                                                    "default top1 (agreement with the fp32 model)")
    p.add_argument("--candidates", help="comma-separated specs, e.g. int8,int4/block32,pal4,pal2,prune50; "
                                        "default with --data and a built-in metric: each layer kind's ladder "
                                        "(int8+bc, pal6/4/3/2 with +gptq+bc; see the README); without data "
                                        "int8,int4/block32,pal6,pal4,pal2,prune50; both filtered to --target")
    p.add_argument("--reference", help="package sweeps: the model proxy metrics compare against (an .mlpackage or "
                                       "package.module:factory); default the uncompressed package itself")
    p.add_argument("--target", default=None, help="deployment target, e.g. iOS16, iOS17, iOS18 (default iOS18; a package's own)")
    p.add_argument("--out", help="output directory, e.g. sensitivity_out/digits (holds the resumable store)")
    p.add_argument("--max-trials", type=int, help="run at most N new trials, then save partial results, e.g. 10")
    p.add_argument("--time-budget", type=float, help="stop starting trials after S seconds, e.g. 120")
    p.add_argument("--weight-threshold", type=int, default=2048,
                   help="only weights with more elements are layers (coremltools' default 2048)")
    p.add_argument("--all-layers", action="store_true", help="include every conv/linear/embedding weight")
    p.add_argument("--batch-size", type=int, default=512, help="evaluation batch size (default 512)")
    p.add_argument("--kmeans", choices=("exact", "fast"), default="exact",
                   help="exact: coremltools' own k-means (default); fast: the batched k-means a plan with "
                        "`kmeans: fast` emits")
    p.add_argument("--groups", metavar="role|block|layer",
                   help="compress layers in groups, one trial per group and spec: role (layers whose names differ "
                        "only in a block index, e.g. blocks.*.attn.q.weight), block (each numbered block, e.g. "
                        "blocks.3.*) or layer (one trial per layer); default layer up to 128 layers, role above")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="who runs the trials: this process (default) or the workers of a Ray cluster "
                        "(pip install -e \".[ray]\"); same store, same values")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="--executor ray: the cluster's head, e.g. 127.0.0.1:6379 (default: RAY_ADDRESS, "
                        "else a new Ray on this machine)")
    p.add_argument("--memory", metavar="SIZE",
                   help="bound the sweep's peak resident memory, e.g. 8GB (1024-based): the model is held once and "
                        "cached activations past the budget spill to disk; results are unchanged")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where trials' forward passes run: cpu (default) or cuda (a GPU; k-means stays on the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the sweep does")
    return p


def _given(argv: Optional[Sequence[str]]) -> set[str]:
    """The options the command line itself gave (whatever their values), so they override a sweep file's fields."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _from_yaml(path: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
               given: frozenset[str] = frozenset()) -> argparse.Namespace:
    """Sweep-file fields, checked and converted like the matching command-line options; relative ``data`` and
    ``out`` paths resolve beside the sweep file; a field whose option the command line gave (``given``) keeps the
    command line's value."""
    from ..yaml_files import data_beside, model_beside, path_beside, read_yaml_mapping

    doc = read_yaml_mapping(path, DataError, "sweep", SWEEP_KEYS)
    actions = {action.dest: action for action in parser._actions}
    for key, value in doc.items():
        if key in given:  # `coreml-opt sensitivity sweep.yaml --out elsewhere`: the flag wins
            continue
        if key == "candidates" and isinstance(value, list):
            value = ",".join(map(str, value))
        if key == "groups" and isinstance(value, dict):  # group name -> patterns: checked by the analyser
            setattr(args, key, value)
            continue
        action = actions[key]
        if value is not None and isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise DataError(f"{path}: {key}", f"must be true or false, got {value!r}", f"write {key}: true")
        elif value is not None and action.type is not None:
            try:
                value = action.type(value if isinstance(value, list) else str(value))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                raise DataError(f"{path}: {key}", f"{value!r} is not valid ({exc})",
                                f"see `python -m coreml_opt.sensitivity --help` for {key}") from None
        if value is not None and action.choices is not None and value not in action.choices:
            raise DataError(f"{path}: {key}", f"{value!r} is not one of {list(action.choices)}",
                            f"use one of {list(action.choices)}")
        if key == "out" and value is not None:
            value = str(path_beside(value, Path(path).parent))
        if key == "data":
            value = data_beside(value, Path(path).parent)
        if key in ("model", "reference"):  # a package path or a path/to/file.py:fn factory
            value = model_beside(value, Path(path).parent)
        setattr(args, key, value)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_coremltools(args.verbose)
    try:
        if args.sweep:
            args = _from_yaml(args.sweep, args, parser, frozenset(_given(argv)))
        from ..evaluation import is_package

        package = bool(args.model) and is_package(args.model)
        if not args.model or not (args.input_shape or args.input or package):
            parser.error("--model and --input-shape (or --input) are required (or pass a sweep YAML file)")
        if args.input_shape and args.input:
            parser.error("give --input-shape or --input, not both")
        if args.reference and not package:
            parser.error("--reference is for a model given as an .mlpackage (a factory sweep compares against "
                         "the fp32 model)")
        if args.address and args.executor != "ray":
            parser.error("--address is for --executor ray")
        from . import analyse, analyse_package
        from .memory import parse_memory

        memory = parse_memory(args.memory, "memory" if args.sweep else "--memory")
        if memory is not None and package:
            raise DataError("--memory", "bounds factory sweeps only (a package sweep runs the package runtime)",
                            "sweep the model's torch factory (--model package.module:fn), or drop --memory")
        from .outputs import bytes_table, header_lines, ranked_table, timing_lines

        options = dict(metric=args.metric, candidates=args.candidates, target=args.target, out_dir=args.out,
                       max_trials=args.max_trials, time_budget=args.time_budget, progress=not args.no_progress,
                       weight_threshold=args.weight_threshold, include_all=bool(args.all_layers),
                       batch_size=args.batch_size, kmeans=args.kmeans, executor=args.executor,
                       address=args.address)
        if package:
            if args.groups not in (None, "layer"):
                raise DataError(f"groups {args.groups!r}", "is not supported for a model given as an .mlpackage",
                                "sweep the PyTorch factory with --groups, or drop --groups")
            result = analyse_package(args.model, args.data, reference=args.reference, device=args.device, **options)
        else:
            result = analyse(args.model, args.input_shape or [args.input], args.data,
                             **{**options, "target": args.target or "iOS18", "device": args.device},
                             groups=args.groups, memory=args.memory)
    except CoreMLOptError as exc:
        where = f"{args.sweep}: " if args.sweep and not str(exc).startswith(str(args.sweep)) else ""
        print(f"error: {where}{exc}", file=sys.stderr)  # a sweep file's field is named with the file
        return 2
    except KeyboardInterrupt:
        kept = (f"; the trials finished so far are kept in {os.path.join(args.out, 'sensitivity.sqlite')}: run the "
                "same command again to resume" if args.out else "; nothing was saved (pass --out DIR to make a "
                "sweep resumable)")
        print(f"error: sweep interrupted (Ctrl-C){kept}", file=sys.stderr)
        return 130
    print("\n".join(header_lines(result)))
    print()
    print(ranked_table(result))
    print()
    print(bytes_table(result))
    print()
    print("\n".join(timing_lines(result)))
    if args.out:
        print(f"wrote {os.path.join(args.out, '')}{{trials.csv,trials.json,sweep.json,summary.md,heatmap.png}}")
    return 0 if result.complete else 3


if __name__ == "__main__":
    sys.exit(main())
