"""`coreml-opt` command line: thin subcommands over the library, one call plus printing each."""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import os
import sys
import warnings
from typing import Sequence

from .errors import CoreMLOptError

logger = logging.getLogger("coreml_opt")


def quiet_coremltools(verbose: bool) -> None:
    """coremltools logs import noise on Linux (no libcoremlpython) and per-pass chatter; hide it unless -v.

    ``coremltools.optimize.torch`` installs its own handler at INFO (from COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL,
    read when it is imported, also by k-means worker processes), so its level is set by the variable and directly.
    """
    if not verbose:
        warnings.filterwarnings("ignore")
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    os.environ["COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL"] = "info" if verbose else "warning"
    for name in ("coremltools", "coremltools.optimize", "coremltools.converters"):
        logging.getLogger(name).setLevel(logging.ERROR if not verbose else logging.WARNING)
    logging.getLogger("coremltools.optimize.torch").setLevel(logging.INFO if verbose else logging.WARNING)
    if "tqdm" in sys.modules:  # already imported (in-process use): TQDM_DISABLE is read only at import
        _default_tqdm_disable(not verbose)


def _default_tqdm_disable(disable: bool) -> None:
    """Make ``disable`` the default of every tqdm bar (coremltools' conversion and pass bars); bars that pass
    ``disable=`` themselves, like ours (shown on a terminal), keep their own choice."""
    from tqdm import tqdm

    init = tqdm.__dict__.get("_coreml_opt_init") or tqdm.__dict__["__init__"]
    tqdm._coreml_opt_init = init
    tqdm.__init__ = functools.partialmethod(init, disable=disable)


INTERRUPTED = "error: interrupted (Ctrl-C); outputs are written atomically, so none is half-written"


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``1,1,8,8`` (or ``1x1x8x8``, or a YAML list) -> (1, 1, 8, 8); argparse type for input shapes."""
    try:
        values = text if isinstance(text, (list, tuple)) else str(text).replace("x", ",").split(",")
        shape = tuple(int(v) for v in values)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape {text!r}: not comma-separated integers; use e.g. 1,1,8,8")
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape {text!r}: dimensions must be positive; use e.g. 1,1,8,8")
    return shape


# ---- subcommands ----------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from .model.convert import convert
    from .model.package import check_package_output

    check_package_output(args.output)  # a bad output path fails before the conversion, not after
    mlmodel, mapping = convert(args.model, args.input_shape, inputs=args.input, target=args.target,
                               output_path=args.output)
    print(f"wrote {args.output}: ML Program for {args.target}, {len(mapping)} weights mapped to PyTorch names")
    return 0


def inventory_rows(inventory) -> tuple[list[str], list[list]]:
    """Table headers and rows for an inventory (shared by inspect and the example job)."""
    headers = ["weight", "torch name", "op type", "op name", "shape", "params", "bytes", "bits/w", "compression"]
    rows = [[w.name, w.torch_name, w.reader_type, w.op_name, w.shape, w.params, w.bytes,
             f"{8 * w.bytes / w.params:.2f}", w.compression] for w in inventory.weights]
    return headers, rows


def cmd_inspect(args: argparse.Namespace) -> int:
    from .model.package import load_package
    from .report.tables import format_table, human_bytes

    loaded = load_package(args.model)
    inventory = loaded.inventory
    if args.json:
        print(json.dumps(inventory.to_dict(), indent=2))
        return 0
    headers, rows = inventory_rows(inventory)
    if args.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["name", "torch_name", "op_type", "op_name", "shape", "params", "bytes", "bits_per_weight",
                         "compression"])
        writer.writerows([[*r[:4], "x".join(map(str, r[4])), *r[5:]] for r in rows])
        print(buffer.getvalue(), end="")
        return 0
    footer = [["total", "", "", "", "", inventory.total_params, inventory.total_bytes,
               f"{inventory.bits_per_weight:.2f}", human_bytes(inventory.total_bytes)]]
    functions = loaded.program.functions
    kind = f"ML Program with functions {', '.join(functions)}" if len(functions) > 1 else "ML Program"
    print(f"{args.model}: {kind}, deployment target iOS{inventory.deployment_target}")
    print(format_table(headers, rows, footer))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .compress import calibration_statistics, compress, missing_calibration_data, needs_statistics
    from .plan import load_plan
    from .report.tables import compression_table

    plan = load_plan(args.config, spec=args.spec, target=args.target)
    if args.kmeans:
        plan.kmeans = args.kmeans
    calibrated = needs_statistics(plan)
    check_measure_args(args, data_used=calibrated)
    statistics = None
    if calibrated:  # +aw/+bc specs: statistics of the package's own layer inputs over --data
        if args.data is None:
            given = f"--spec {args.spec}" if args.spec else f"-c {args.config}"
            raise missing_calibration_data(given)
        statistics = calibration_statistics(args.model, args.data, specs=plan._all_specs())
    measure = None
    if args.measure:  # data, metric and reference are checked before anything is written
        from .measure import CompressMeasure

        measure = CompressMeasure(args.model, args.data, args.metric or "accuracy", reference=args.reference)
    report = compress(args.model, plan, args.output, statistics=statistics)
    measured = None
    if measure:
        from .simulate import using_statistics

        with using_statistics(statistics):
            measured = measure.run(report.output, {w.name: w.spec for w in report.weights}, plan.kmeans)
    if args.json:
        print(json.dumps({"output": str(report.output), "passes": report.passes,
                          "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
                          "bytes_predicted": report.bytes_predicted, "skipped": report.skipped,
                          "weights": [w.__dict__ for w in report.weights],
                          "measured": measured.to_dict() if measured else None}, indent=2))
        return 0
    print(compression_table(report))
    for name, reason in report.skipped.items():
        print(f"left {name} in fp16, as coremltools would: {reason}")
    print(f"wrote {report.output} ({', '.join(report.passes) or 'no compression'})")
    if measured is not None:
        print(measured.line())
    return 0


def check_measure_args(args: argparse.Namespace, data_used: bool = False) -> None:
    """--measure needs --data (compress); --data/--metric/--reference without --measure are refused, not ignored
    (``data_used``: --data also feeds compensated specs' calibration)."""
    if args.measure and getattr(args, "data", "") is None:
        raise CoreMLOptError("--measure", "needs evaluation data", "pass --data FOLDER|FILE.npz|package.module:fn")
    given = [f"--{k}" for k in ("data", "metric", "reference") if getattr(args, k, None) is not None
             and not (k == "data" and data_used)]
    if given and not args.measure:
        raise CoreMLOptError(given[0], "is used only with --measure", "add --measure, or drop " + given[0])


def add_measure_arguments(p: argparse.ArgumentParser, data: bool = True) -> None:
    """--measure (and its data, metric and reference for commands that have none of their own)."""
    p.add_argument("--measure", action="store_true", help="also run the written package with the package runtime "
                   "and print its metric next to the simulated figure")
    if data:
        p.add_argument("--data", help="with --measure, or for compensated specs (+aw, +bc): calibration folder, "
                       ".npz or package.module:fn")
        p.add_argument("--metric", help="with --measure: accuracy (labels; the default), top1, kl, psnr, ...")
        p.add_argument("--reference", help="with --measure: reference .mlpackage or factory (default: the input "
                                           "package)")


def cmd_eval(args: argparse.Namespace) -> int:
    from .runtime.evaluate import evaluate_package
    from .units import format_drop, format_metric, is_fraction

    result = evaluate_package(args.model, args.data, args.metric, reference=args.reference,
                              precision=args.precision, device=args.device)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    fraction = is_fraction(result.metric_name)  # accuracy-like in %, drops in pp; --json keeps metric units
    line = (f"{result.metric_name} {format_metric(result.metric, fraction)} on {result.samples} samples "
            f"({result.precision} runtime)")
    if result.drop is not None:
        line += f"; reference {format_metric(result.reference, fraction)}, drop {format_drop(result.drop, fraction)}"
    print(line)
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from .example import run_example

    result = run_example(args.out, spec=args.spec, plan_path=args.config)
    print(result.summary())
    return 0


def cmd_xcode_prep(args: argparse.Namespace) -> int:
    from .units import format_metric, is_fraction
    from .xcode import issue_for_error, prepare, prepare_workflow, resolve_arguments

    plan, workflow = args.config, args.workflow
    try:
        model, plan, workflow, output = resolve_arguments(args.model, args.config, args.output, os.environ,
                                                          workflow=args.workflow)
        if workflow is not None and args.data is not None:
            raise CoreMLOptError(f"--data {args.data}", "applies to plans (-c) only",
                                 "name the calibration data in the workflow's data_free stage (`data:`)")
        if workflow is not None:
            result = prepare_workflow(workflow, output, stage=args.stage, model=model, force=args.force,
                                      env=os.environ)
        elif args.stage is not None:
            raise CoreMLOptError(f"--stage {args.stage}", "applies to workflows only",
                                 "pass -w workflow.yaml, or drop --stage")
        else:
            result = prepare(model, plan, output, data=args.data, force=args.force, env=os.environ)
    except CoreMLOptError as exc:
        print(issue_for_error(exc, plan, workflow=workflow), file=sys.stderr)
        return 2
    for issue in result.warnings:
        print(issue, file=sys.stderr)
    if result.status == "up-to-date":
        inputs = ("workflow, plan, data, model state" if workflow is not None
                  else "model, plan, data" if args.data is not None else "model, plan")
        print(f"coreml-opt: {result.output} is up to date ({inputs} and versions unchanged)")
    elif result.workflow is not None:
        outcome = next(s.outcome for s in result.workflow.stages if s.name == result.stage)
        print(f"coreml-opt: wrote {result.output} (stage {result.stage} of workflow {result.workflow.name}: "
              f"{result.workflow.metric} {format_metric(outcome.metric, is_fraction(result.workflow.metric))}, "
              f"{result.workflow.fp16_bytes} -> "
              f"{outcome.inventory.total_bytes} weight bytes; report {result.workflow.out / 'report.md'})")
    else:
        report = result.report
        print(f"coreml-opt: wrote {result.output} ({report.bytes_before} -> {report.bytes_after} weight bytes, "
              f"{', '.join(report.passes) or 'no compression'})")
        for name, reason in report.skipped.items():
            print(f"coreml-opt: left {name} in fp16, as coremltools would: {reason}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .workflows import run_workflow

    result = run_workflow(args.workflow, out=args.out, progress=True,  # bars show on a terminal only
                          measure=args.measure)
    print(result.summary(), end="")
    written = [result.out / "fp16.mlpackage", result.out / "plan.yaml"]
    written += [result.out / "sensitivity"] if "auto_plan" in (result.plan or {}) else []
    written += [s.outcome.package for s in result.stages if s.outcome is not None]
    written += [result.out / "report.md", result.out / "report.json"]
    print("wrote " + ", ".join(str(path) for path in written if os.path.exists(path)))
    failed = result.failed
    if failed is not None:
        print(f"error: stage {failed.name} failed: {failed.error}; earlier stages' packages are kept in {result.out}",
              file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.html import write_report

    files = write_report(args.dir, args.output, markdown=None if args.no_markdown else (args.markdown or ""),
                         measure=not args.no_measure)
    print(f"wrote {files.html}" + (f" and {files.markdown}" if files.markdown else ""))
    for line in files.missing:
        print(f"not found: {line}")
    return 0


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coreml-opt", description=__doc__.splitlines()[0] if __doc__ else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and coremltools' own messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("sensitivity", add_help=False,
                   help="rank layers by metric drop (see `coreml-opt sensitivity --help`)")

    p = sub.add_parser("convert", help="convert a PyTorch model to an ML Program, keeping PyTorch weight names",
                       description="example: coreml-opt convert coreml_opt.zoo:digits_cnn --input-shape 1,1,8,8 "
                                   "-o digits.mlpackage\n"
                                   "         coreml-opt convert mymodels:tiny_bert --input ids:1,16:int32 "
                                   "--input mask:1,16 -o bert.mlpackage",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="PyTorch model factory, package.module:function")
    shapes = p.add_mutually_exclusive_group(required=True)
    shapes.add_argument("--input-shape", type=parse_shape, help="shape of the one float input, e.g. 1,1,8,8")
    shapes.add_argument("--input", action="append", metavar="NAME:SHAPE[:DTYPE]",
                        help="one input, repeated in forward() order, e.g. --input ids:1,16:int32 "
                             "--input mask:1,16 (dtypes fp32, fp16, int32; int ids are drawn below the "
                             "smallest embedding vocabulary for tracing)")
    p.add_argument("-o", "--output", required=True, help="output .mlpackage path")
    p.add_argument("--target", default="iOS18", help="minimum deployment target (iOS16, iOS17, iOS18, macOS13..15)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="list every compressible weight with shape, bytes and compression",
                       description="example: coreml-opt inspect digits.mlpackage --json")
    p.add_argument("model", help=".mlpackage to inspect")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compress", help="data-free compression of an .mlpackage by a plan or one spec",
                       description="example: coreml-opt compress digits.mlpackage --spec int4/block32 "
                                   "-o digits-int4.mlpackage --target iOS18")
    p.add_argument("model", help="input .mlpackage (uncompressed ML Program)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("-c", "--config", help="plan YAML (global, op_types, layers, skip, target)")
    how.add_argument("--spec", help="one spec for every weight, e.g. int8, int4/block32, pal4/g16, prune50")
    p.add_argument("-o", "--output", required=True, help="output .mlpackage (written atomically)")
    p.add_argument("--target", help="deployment target; overrides the plan's")
    p.add_argument("--kmeans", choices=["exact", "fast"], help="k-means for palettes: coremltools' (exact) or ours")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_measure_arguments(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="run an .mlpackage on Linux (package runtime) and score it with a metric",
                       description="example: coreml-opt eval digits-int4.mlpackage --data calibration_data/digits "
                                   "--metric accuracy --reference digits.mlpackage")
    p.add_argument("model", help=".mlpackage (ML Program) to run")
    p.add_argument("--data", required=True, help="calibration folder, .npz or package.module:fn")
    p.add_argument("--metric", default="accuracy", help="accuracy (labels), top1, kl, psnr, sqnr, cosine")
    p.add_argument("--reference", help="reference .mlpackage or PyTorch factory package.module:fn (for the drop)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp32: every op in fp32; fp16: each op's output rounded to fp16 (GPU/ANE-like)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object (its metric key holds the value)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("example", help="the main job on the bundled digits model: build, convert, compress, report",
                       description="example: coreml-opt example --out out/example")
    p.add_argument("--out", default="out/example", help="folder for the packages and reports")
    p.add_argument("--spec", help="compress with one spec instead of the example plan")
    p.add_argument("-c", "--config", help="plan YAML instead of the example plan")
    p.set_defaults(func=cmd_example)

    from .planning.cli import add_plan_parser

    add_plan_parser(sub)  # `coreml-opt plan DIR --bpw 4 | --size 12MB | --max-drop 0.5`

    p = sub.add_parser("xcode-prep", help="Xcode Run Script step: compress by a plan or a workflow, skip when "
                                          "inputs are unchanged",
                       description="example: coreml-opt xcode-prep \"$SRCROOT/Models/Digits.mlpackage\" "
                                   "-c \"$SRCROOT/Models/digits-plan.yaml\" -o \"$DERIVED_FILE_DIR/Digits.mlpackage\", "
                                   "or coreml-opt xcode-prep -w \"$SRCROOT/Models/digits-pal2.yaml\" "
                                   "-o \"$DERIVED_FILE_DIR/Digits.mlpackage\"; omitted arguments come from "
                                   "SCRIPT_INPUT_FILE_n (the .mlpackage, and the .yaml: a workflow if it has "
                                   "stages:, else a plan) and SCRIPT_OUTPUT_FILE_0")
    p.add_argument("model", nargs="?", help="input .mlpackage (default: the .mlpackage among SCRIPT_INPUT_FILE_n); "
                                            "with -w optional, and not an .mlpackage: an extra input file "
                                            "(e.g. the model's .py) whose change reruns the workflow")
    source = p.add_mutually_exclusive_group()
    source.add_argument("-c", "--config", help="plan YAML (default: the .yaml among SCRIPT_INPUT_FILE_n)")
    source.add_argument("-w", "--workflow", help="workflow YAML: run it from its model: factory and take a "
                                                 "stage's package (default: a .yaml input with stages:)")
    p.add_argument("--stage", metavar="NAME", help="with -w: the stage whose package to take (default: the last)")
    p.add_argument("-o", "--output", help="output .mlpackage (default: SCRIPT_OUTPUT_FILE_0)")
    p.add_argument("--data", metavar="DATA", help="with -c: calibration data (FOLDER|FILE.npz|package.module:fn) for a "
                                                  "plan with +aw, +gptq or +bc specs, the data the plan was made on; "
                                                  "a change to it reruns the step (list it under Input Files)")
    p.add_argument("--force", action="store_true", help="compress even when the inputs are unchanged")
    p.set_defaults(func=cmd_xcode_prep)

    p = sub.add_parser("report", help="one self-contained HTML page (and its .md beside it) from a run folder",
                       description="example: coreml-opt report out/run -o report.html  (DIR may hold a sensitivity "
                                   "sweep, plan YAML or --json output, .mlpackage files and workflow report.json; "
                                   "what is missing is named in the page)")
    p.add_argument("dir", metavar="DIR", help="run folder: a sweep output folder, or a folder holding one and more")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--markdown", metavar="MD", help="Markdown file (default: the HTML path with .md)")
    p.add_argument("--no-markdown", action="store_true", help="write the HTML page only")
    p.add_argument("--no-measure", action="store_true", help="do not evaluate plans in PyTorch; use saved or "
                                                            "predicted figures")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="run a workflow file: data-free, calibration and fine-tuning stages to .mlpackage",
                       description="example: coreml-opt run workflows/digits-pal2.yaml")
    p.add_argument("workflow", help="workflow YAML (see workflows/)")
    p.add_argument("--out", help="output folder (default: the workflow's out:)")
    add_measure_arguments(p, data=False)  # the workflow's eval: data and metric
    p.set_defaults(func=cmd_run)
    return parser


def run(argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the subcommand; user errors become one line on stderr and exit code 2, Ctrl-C one
    line and exit code 130 (the shell's 128 + SIGINT)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def _run(argv: Sequence[str] | None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    verbose = "-v" in argv or "--verbose" in argv
    # tqdm reads TQDM_DISABLE when it is imported, so set it before anything imports coremltools.
    os.environ.setdefault("TQDM_DISABLE", "0" if verbose else "1")
    quiet_coremltools(verbose)
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    if rest[:1] == ["sensitivity"]:  # same options as `python -m coreml_opt.sensitivity`
        from .sensitivity.__main__ import main as sensitivity_main

        return sensitivity_main(rest[1:] + (["--verbose"] if verbose else []))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CoreMLOptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    return run(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
