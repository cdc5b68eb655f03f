"""Package-only sweeps and plans: the digits package, run by the package runtime, one weight const swapped per
trial, gives the factory sweep's trials; plans are measured on the package and emitted by compressing it."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from coreml_opt import zoo
from coreml_opt.data import load_dataset
from coreml_opt.evaluation import Evaluator, PackageBackend, TorchBackend
from coreml_opt.sensitivity import analyse, analyse_package, load_sweep

DATA = "calibration_data/digits"
FACTORY = "coreml_opt.zoo:digits_cnn"
CANDIDATES = "int8,pal4,pal2,int4/block32,pal4/g16"
# Trials are the same weights (the simulation engine on the package's fp16 const equals it on the fp16 copy of
# the torch parameter), run by the runtime in fp32 vs torch eager in fp32: outputs agree to ~1e-6 relative
# (accumulation order). KL of two near-equal distributions is a difference of near-equal terms, so its
# relative error is larger: measured at most 8.4e-6 (pal4 ~1e-5 nats), and about 1e-12 nats absolute for the
# int8 trials (~1e-8 nats, where fp32 cancellation dominates). Hence rtol 5e-5 with atol 1e-11 nats.
KL_RTOL, KL_ATOL = 5e-5, 1e-11


@pytest.fixture(scope="session")
def kl_sweeps(example_mlpackage):
    """(factory sweep, package sweep against the same fp32 reference) with kl."""
    factory = analyse(FACTORY, zoo.EXAMPLE_INPUT_SHAPE, DATA, metric="kl", candidates=CANDIDATES, progress=False)
    package = analyse_package(example_mlpackage, DATA, metric="kl", candidates=CANDIDATES, progress=False,
                              reference=FACTORY)
    return factory, package


def _by_key(result):
    return {(t.layer, t.spec): t for t in result.trials}


def test_package_sweep_gives_the_factory_sweeps_trials(kl_sweeps):
    factory, package = kl_sweeps
    assert [layer.to_dict() for layer in package.layers] == [layer.to_dict() for layer in factory.layers]
    assert package.skipped_trials == factory.skipped_trials
    assert package.target == factory.target == "iOS18"
    want, got = _by_key(factory), _by_key(package)
    assert sorted(got) == sorted(want) and len(got) == 5 * 5
    for key, trial in want.items():
        assert got[key].bytes == trial.bytes, key
        assert got[key].metric == pytest.approx(trial.metric, rel=KL_RTOL, abs=KL_ATOL), key
    assert package.baseline == pytest.approx(factory.baseline, rel=KL_RTOL, abs=KL_ATOL)


def test_package_sweep_top1_against_the_package_itself_equals_the_factory_sweep(example_mlpackage):
    """Default reference (the uncompressed package): top-1 agreement counts come out identical."""
    factory = analyse(FACTORY, zoo.EXAMPLE_INPUT_SHAPE, DATA, metric="top1", candidates="pal2,int4/block32",
                      progress=False)
    package = analyse_package(example_mlpackage, DATA, metric="top1", candidates="pal2,int4/block32",
                              progress=False)
    assert {k: t.metric for k, t in _by_key(package).items()} == {k: t.metric for k, t in _by_key(factory).items()}
    assert package.baseline == package.fp32_metric == 1.0


def test_package_sweep_builds_the_graph_once(example_mlpackage, monkeypatch):
    import coreml_opt.runtime as runtime

    calls = []
    real = runtime.load_graph
    monkeypatch.setattr(runtime, "load_graph", lambda path: calls.append(path) or real(path))
    result = analyse_package(example_mlpackage, DATA, metric="kl", candidates="int8,pal2", progress=False)
    assert result.ran == 10 and len(calls) == 1


def test_set_values_swaps_one_weight_and_restores_bit_exactly(example_mlpackage):
    x = load_dataset(DATA).x[:16]
    fresh = PackageBackend(example_mlpackage)(x)
    backend = PackageBackend(example_mlpackage, variables=["features_3_weight_to_fp16"])
    stored = backend.executable.values["features_3_weight_to_fp16"].clone()
    assert torch.equal(backend(x), fresh)
    backend.set_values({"features_3_weight_to_fp16": torch.zeros_like(stored)})
    assert not torch.equal(backend(x), fresh)
    backend.set_values({"features_3_weight_to_fp16": stored})
    assert torch.equal(backend(x), fresh)
    with pytest.raises(KeyError):
        backend.set_values({"features_7_weight_to_fp16": stored})


def test_one_evaluator_scores_both_backends(example_mlpackage):
    data = load_dataset(DATA)
    model = zoo.digits_cnn()
    evaluator = Evaluator("accuracy", data, TorchBackend(model))
    torch_accuracy, package_accuracy = evaluator(model), evaluator(PackageBackend(example_mlpackage))
    assert abs(package_accuracy - torch_accuracy) <= 1 / len(data)  # fp16 weights may flip one sample
    kl = Evaluator("kl", data, TorchBackend(model))
    assert kl(model) == pytest.approx(0.0, abs=1e-9) and 0.0 <= kl(PackageBackend(example_mlpackage)) < 1e-6


def test_cli_package_sweep_writes_every_output_and_resumes(example_mlpackage, tmp_path):
    out = tmp_path / "sweep"
    argv = ("sensitivity", "--model", str(example_mlpackage), "--data", DATA, "--metric", "kl",
            "--candidates", "int8,pal4", "--out", str(out), "--no-progress")
    code, stdout, stderr = run_cli(*argv)
    assert code == 0, stderr
    assert "10 run now, 0 from the store" in stdout and "package baseline" in stdout
    for name in ("trials.csv", "trials.json", "sweep.json", "summary.md", "heatmap.png", "sensitivity.sqlite"):
        assert (out / name).is_file(), name
    sweep, trials = load_sweep(out)
    assert (out / sweep["model"]).resolve() == Path(example_mlpackage).resolve()
    assert sweep["input_shape"] == list(zoo.EXAMPLE_INPUT_SHAPE) and len(trials) == 10
    code, stdout, _ = run_cli(*argv)
    assert code == 0 and "0 run now, 10 from the store" in stdout


def test_sweep_file_model_package_resolves_beside_the_file(example_mlpackage, tmp_path, monkeypatch):
    folder = tmp_path / "project"
    shutil.copytree(example_mlpackage, folder / "models" / "digits.mlpackage")
    shutil.copytree(DATA, folder / "data")
    (folder / "sweep.yaml").write_text(yaml.safe_dump({"model": "models/digits.mlpackage", "data": "data",
                                                       "metric": "top1", "candidates": ["pal2"], "out": "out"}))
    sweep_file = str(folder / "sweep.yaml")
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli("sensitivity", sweep_file, "--no-progress")
    assert code == 0, stderr
    assert json.loads((folder / "out" / "sweep.json").read_text())["model"] == "../models/digits.mlpackage"


def test_plan_emit_from_a_package_sweep_compresses_the_package(example_mlpackage, tmp_path):
    from coreml_opt.evaluation import evaluate_package

    sweep_dir = tmp_path / "sweep"
    analyse_package(example_mlpackage, DATA, metric="kl", candidates="int8,pal4,pal2", progress=False,
                    out_dir=sweep_dir)
    emitted = tmp_path / "planned.mlpackage"
    code, stdout, stderr = run_cli("plan", str(sweep_dir), "--bpw", "4", "--emit", str(emitted), "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["emitted_bytes"] == doc["bytes"]
    # the plan's measured metric is the emitted package's, run by the runtime against the original package
    shipped = evaluate_package(emitted, DATA, "kl", reference=str(example_mlpackage))
    assert shipped.metric == pytest.approx(doc["measured_metric"], rel=1e-4, abs=1e-10)


def test_package_sweep_bad_input_is_one_line(example_mlpackage, example_iOS16_mlpackage, tmp_path):
    import numpy as np

    np.savez(tmp_path / "rgb.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    for argv, fragment in (
            (("--model", str(example_mlpackage), "--data", str(tmp_path / "rgb.npz")), "takes inputs of shape"),
            (("--model", str(tmp_path / "missing.mlpackage"), "--data", DATA), "does not exist"),
            (("--model", str(example_mlpackage), "--data", DATA, "--metric", "coreml_opt.zoo:digits_cnn"),
             "is a package"),
            (("--model", str(example_iOS16_mlpackage), "--data", DATA, "--target", "iOS18"), "targets iOS16")):
        code, _, stderr = run_cli("sensitivity", *argv, "--no-progress")
        assert code == 2 and fragment in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_workflows_and_runtime_no_longer_reach_into_sensitivity_for_evaluation():
    root = Path(__file__).resolve().parents[1] / "coreml_opt"
    for path in [*(root / "workflows").glob("*.py"), *(root / "runtime").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("sensitivity.evaluate", "sensitivity.reference",
                                                   "sensitivity.suffix")), (path, node.module)


def test_rerunning_only_the_ops_after_the_weight_changes_no_result(example_mlpackage):
    """Trials from cached values before the swapped weight's first reader equal full runs bit for bit."""
    kwargs = dict(metric="kl", candidates="pal2,int4/block32", progress=False)
    cached = analyse_package(example_mlpackage, DATA, **kwargs)
    full = analyse_package(example_mlpackage, DATA, use_prefix=False, **kwargs)
    assert [(t.layer, t.spec, t.metric) for t in cached.trials] == [(t.layer, t.spec, t.metric) for t in full.trials]
    backend = PackageBackend(example_mlpackage, variables=["classifier_0_weight_to_fp16"])
    assert 0 < backend.executable.first_reader("classifier_0_weight_to_fp16") < len(backend.executable.steps)
