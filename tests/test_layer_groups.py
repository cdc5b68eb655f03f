"""Layer groups (issue #14 item 3): sweeps of a transformer stack by role or block take one trial per group and
spec, plans pick one spec per group, and the emitted package stores exactly the predicted bytes."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from coreml_opt.errors import DataError
from coreml_opt.sensitivity.groups import block_name, resolve_groups, role_name
from coreml_opt.sensitivity.layers import find_layers
from tests.conftest import run_cli

CANDIDATES = "int8,pal4,int4/block32"


class _Block(nn.Module):
    """A pre-norm transformer block: q/k/v/proj attention and a ReLU MLP."""

    def __init__(self, d: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        attn = torch.softmax(self.q(y) @ self.k(y).transpose(-1, -2) / 8.0, dim=-1) @ self.v(y)
        x = x + self.proj(attn)
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Stack(nn.Module):
    """A 48-wide input projection (block32 does not divide 48), three blocks and a head: 20 layers."""

    def __init__(self, blocks: int = 3, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(48, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def stack() -> nn.Module:
    """Seeded factory (``tests/test_layer_groups.py:stack``), so plans re-measure the same random stack."""
    torch.manual_seed(0)
    return _Stack().eval()


def _sweep(out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli("sensitivity", "--model", f"{__file__}:stack", "--input-shape", "1,8,48", "--metric", "kl",
                   "--candidates", CANDIDATES, "--out", str(out), "--no-progress", *extra)


def _trials(out: Path) -> list[dict]:
    return json.loads((out / "trials.json").read_text())


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict[str, Path]:
    """The stack swept per layer, then by role into the same store, and by block into another folder."""
    root = tmp_path_factory.mktemp("groups")
    runs = {}
    for mode, folder in (("layer", "shared"), ("role", "shared"), ("block", "block")):
        out = root / folder / mode
        if mode == "role":  # the same store as the per-layer sweep: its groups of one reuse those rows
            (root / folder / "role").mkdir(parents=True)
            (root / folder / "role" / "sensitivity.sqlite").write_bytes(
                (root / folder / "layer" / "sensitivity.sqlite").read_bytes())
        code, stdout, err = _sweep(out, "--groups", mode)
        assert code == 0, err
        runs[mode] = out
        runs[f"{mode}_stdout"] = stdout
    return runs


def test_role_and_block_names_replace_the_block_index():
    assert role_name("blocks.3.attn.q_proj.weight") == "blocks.*.attn.q_proj.weight"
    assert role_name("features.3.0.conv.weight") == "features.*.*.conv.weight"
    assert role_name("head.weight") == "head.weight"
    assert block_name("blocks.3.attn.q_proj.weight") == "blocks.3.*"
    assert block_name("head.weight") == "head.weight"


def test_role_groups_of_a_stack_hold_one_layer_per_block():
    layers = find_layers(stack())
    mode, groups = resolve_groups(layers, "role")
    assert mode == "role" and len(layers) == 20
    assert [g.layer for g in groups] == ["embed.weight", "blocks.*.q.weight", "blocks.*.k.weight",
                                         "blocks.*.v.weight", "blocks.*.proj.weight", "blocks.*.fc1.weight",
                                         "blocks.*.fc2.weight", "head.weight"]
    assert [m.layer for m in groups[1].members] == [f"blocks.{i}.q.weight" for i in range(3)]
    _, blocks = resolve_groups(layers, "block")
    assert [g.layer for g in blocks] == ["embed.weight", "blocks.0.*", "blocks.1.*", "blocks.2.*", "head.weight"]
    assert resolve_groups(layers, None)[0] == "layer"  # 20 layers: per layer by default
    deep = [replace(layer, layer=f"blocks.{i}.{layer.layer.split('.', 2)[-1]}") for i in range(30)
            for layer in layers[1:7]]  # 180 layers of 30 blocks
    mode, groups = resolve_groups(deep, None)
    assert mode == "role" and len(groups) == 6 and all(len(g.members) == 30 for g in groups)


def test_group_sweeps_take_fewer_trials_and_groups_of_one_reuse_per_layer_rows(swept):
    per_layer, role, block = (_trials(swept[m]) for m in ("layer", "role", "block"))
    # embed.weight (48 wide) cannot take int4/block32: 20 x 3 - 1 per-layer trials, 8 x 3 - 1 role trials
    assert len(per_layer) == 59 and len(role) == 23 and len(block) == 14
    sweep = json.loads((swept["role"] / "sweep.json").read_text())
    assert sweep["grouping"] == "role" and len(sweep["layers"]) == 20  # every swept weight, for the planner
    assert {g["name"]: len(g["members"]) for g in sweep["groups"]}["blocks.*.fc1.weight"] == 3
    assert sweep["ran"] == 18 and sweep["reused"] == 5  # embed and head: the per-layer rows, not run again
    rows = {(t["layer"], t["spec"]): t for t in role}
    assert rows[("head.weight", "pal4")]["metric"] == {(t["layer"], t["spec"]): t for t in per_layer}[
        ("head.weight", "pal4")]["metric"]
    fc1 = rows[("blocks.*.fc1.weight", "pal4")]
    assert fc1["members"] == [f"blocks.{i}.fc1.weight" for i in range(3)]
    assert fc1["bytes"] == sum(t["bytes"] for t in per_layer if t["spec"] == "pal4" and ".fc1." in t["layer"])
    assert "groups: role, 8 groups of 20 layers" in swept["role_stdout"]
    assert (swept["role"] / "heatmap.png").stat().st_size > 0
    csv_rows = list(csv.DictReader((swept["role"] / "trials.csv").open()))
    assert {r["members"] for r in csv_rows if r["layer"] == "blocks.*.q.weight"} == {
        "blocks.0.q.weight blocks.1.q.weight blocks.2.q.weight"}
    code, out, err = _sweep(swept["role"], "--groups", "role")  # resumes: nothing left to run
    assert code == 0, err
    assert json.loads((swept["role"] / "sweep.json").read_text())["ran"] == 0


def test_a_group_trial_measures_all_members_compressed_at_once(swept):
    from coreml_opt.planning.session import PlanningSession

    session = PlanningSession.open(swept["block"])
    rows = {(t["layer"], t["spec"]): t for t in _trials(swept["block"])}
    others = {c.layer: "none" for c in session.problem.choices}
    measured = session.measure({**others, "blocks.1.*": "pal4"})
    assert measured == pytest.approx(rows[("blocks.1.*", "pal4")]["metric"], rel=1e-6, abs=1e-12)
    single = session.measure({**others, "blocks.1.*": "none", "head.weight": "int8"})
    assert single != measured


@pytest.mark.parametrize("mode", ["role", "block"])
def test_plan_picks_one_spec_per_group_and_the_package_stores_the_predicted_bytes(swept, tmp_path, mode):
    from coreml_opt.model.package import load_package
    from coreml_opt.plan import Plan

    emitted = tmp_path / f"{mode}.mlpackage"
    code, out, err = run_cli("plan", str(swept[mode]), "--bpw", "5", "--json", "-o", str(tmp_path / "plan.yaml"),
                             "--emit", str(emitted))
    assert code == 0, err
    result = json.loads(out)
    assert result["emitted_bytes"] == result["bytes"] == load_package(emitted).inventory.total_bytes
    assert result["bits_per_weight"] <= 5.0 and result["measured_metric"] is not None
    groups = {g["name"]: g["members"] for g in json.loads((swept[mode] / "sweep.json").read_text())["groups"]}
    assert set(result["groups"]) == set(groups)
    plan = Plan.load(tmp_path / "plan.yaml")
    for name, spec in result["groups"].items():
        taken = {str(plan.layers.get(m, "none")) for m in groups[name]}
        assert taken == {spec}, name
        assert {result["layers"][m] for m in groups[name]} == {spec}  # --json lists the plan per weight too


def test_a_member_that_cannot_take_the_spec_stays_fp16_and_bytes_still_match(tmp_path):
    from coreml_opt.model.package import load_package

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"model: {__file__}:stack\ninput_shape: [1, 8, 48]\nmetric: kl\ncandidates: [int4/block32]\n"
                          "out: out\ngroups:\n  inputs_and_q: ['embed.weight', 'blocks.*.q']\n")
    code, out, err = run_cli("sensitivity", str(sweep_file), "--no-progress")
    assert code == 0, err
    assert "skipped embed.weight x int4/block32: block size 32 does not divide" in out
    rows = {t["layer"]: t for t in _trials(tmp_path / "out")}
    assert rows["inputs_and_q"]["members"] == [f"blocks.{i}.q.weight" for i in range(3)]
    emitted = tmp_path / "all.mlpackage"
    code, out, err = run_cli("plan", str(tmp_path / "out"), "--ratio", "2", "--json", "--no-validate",
                             "--emit", str(emitted))
    assert code == 0, err
    result = json.loads(out)
    assert result["groups"]["inputs_and_q"] == "int4/block32"
    assert result["layers"]["embed.weight"] == "none" and result["layers"]["blocks.2.q.weight"] == "int4/block32"
    assert result["emitted_bytes"] == result["bytes"] == load_package(emitted).inventory.total_bytes


@pytest.mark.parametrize("groups, message", [
    ("{q: ['blocks.*.query']}", "groups: q: pattern 'blocks.*.query': matches no swept layer"),
    ("{attn: ['blocks.*.q*', 'blocks.*.k*'], queries: ['*.q.weight']}",
     "groups: queries: pattern '*.q.weight': matches layer 'blocks.0.q.weight', which group 'attn' already holds"),
    ("rows", "groups 'rows': is not one of role, block, layer"),
    ("{q: 3}", "groups: 'q': must map a group name to a list of layer-name patterns"),
])
def test_bad_group_patterns_are_one_line(tmp_path, groups, message):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"model: {__file__}:stack\ninput_shape: [1, 8, 48]\nmetric: kl\ncandidates: [int8]\n"
                          f"out: out\ngroups: {groups}\n")
    code, out, err = run_cli("sensitivity", str(sweep_file), "--no-progress")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_python_api_takes_a_mapping_and_refuses_overlaps():
    from coreml_opt.sensitivity import analyse

    result = analyse(stack(), (1, 8, 48), metric="kl", candidates="pal4", progress=False,
                     groups={"mlp": ["blocks.*.fc1.weight", "blocks.*.fc2.weight"]})
    assert [g.layer for g in result.groups].count("mlp") == 1
    assert len(result.trials) == 20 - 6 + 1
    with pytest.raises(DataError, match="which group 'a' already holds"):
        analyse(stack(), (1, 8, 48), metric="kl", candidates="pal4", progress=False,
                groups={"a": ["blocks.0.*"], "b": ["*.fc1"]})


@pytest.mark.slow
def test_trained_fashion_vit_sweeps_plans_and_emits_by_role(tmp_path):
    """The zoo's trained ViT (4 blocks): 7 role groups instead of 25 layers, a 4-bit plan of one spec per role
    whose package stores the predicted bytes, and the plan's accuracy measured."""
    from coreml_opt import fashion_vit as vit
    from coreml_opt.model.package import load_package
    from coreml_opt.sensitivity import analyse

    if not vit.fashion_available():
        pytest.skip(f"Fashion-MNIST absent from {vit.FASHION_DIR} (apt-get install -y dataset-fashion-mnist)")
    data = f"{Path(__file__).parent / 'test_fashion_vit.py'}:fashion_test_300"
    sweep = analyse("coreml_opt.zoo:fashion_vit", vit.FASHION_INPUT_SHAPE, data, metric="accuracy",
                    candidates="int4/block32,pal4,pal2", out_dir=tmp_path / "sens", progress=False, groups="role")
    assert len(sweep.layers) == 25 and len(sweep.groups) == 7
    assert len(sweep.trials) == 7 * 3 - 1  # patch.weight (64,1,7,7) takes no block32; per layer: 74 trials
    assert sweep.baseline >= 0.80
    emitted = tmp_path / "vit-4bpw.mlpackage"
    code, out, err = run_cli("plan", str(tmp_path / "sens"), "--bpw", "4", "--json", "--emit", str(emitted))
    assert code == 0, err
    result = json.loads(out)
    assert result["bits_per_weight"] <= 4.0 and set(result["groups"]) == {g.layer for g in sweep.groups}
    assert result["emitted_bytes"] == result["bytes"] == load_package(emitted).inventory.total_bytes
    assert 0.0 < result["measured_metric"] <= 1.0
    assert result["measured_drop"] == pytest.approx(result["baseline"] - result["measured_metric"])


def test_report_costs_a_grouped_plan_by_its_groups(swept, tmp_path):
    """`coreml-opt report` on a folder with a role sweep and its plan: the plan's point is the plan's own size and
    measured metric (the plan YAML lists members; the sweep's choices are groups)."""
    import shutil

    from coreml_opt.report.collect import collect
    from coreml_opt.report.summary import sensitivity_lines

    # a copy at the same depth as the sweep: sweep.json records its file.py:fn model relative to itself
    tmp_path = swept["role"].parent.parent / "report"
    shutil.copytree(swept["role"], tmp_path / "sens")
    code, out, err = run_cli("plan", str(tmp_path / "sens"), "--bpw", "5", "--json", "-o", str(tmp_path / "plan.yaml"))
    assert code == 0, err
    result = json.loads(out)
    report = collect(tmp_path)
    assert report.plan_point["bits_per_weight"] == pytest.approx(result["bits_per_weight"], abs=1e-4)
    assert report.plan_point["metric"] == pytest.approx(result["measured_metric"], rel=1e-9)
    assert "20 layers in 8 role groups" in " ".join(sensitivity_lines(report))
    (tmp_path / "plan.yaml").unlink()  # the plan read back from `plan --json` output alone
    (tmp_path / "plan.json").write_text(out)
    report = collect(tmp_path)
    assert report.plan_point["bits_per_weight"] == pytest.approx(result["bits_per_weight"], abs=1e-4)


def test_groups_on_a_package_sweep_are_refused_in_one_line(example_mlpackage, tmp_path):
    code, out, err = run_cli("sensitivity", "--model", str(example_mlpackage), "--metric", "kl", "--candidates",
                             "int8", "--groups", "role", "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert "groups 'role': is not supported for a model given as an .mlpackage" in err


def test_bundled_vit_groups_file_names_disjoint_groups_of_the_vit():
    from coreml_opt import zoo
    from coreml_opt.sensitivity.__main__ import _from_yaml, build_parser

    path = Path(__file__).resolve().parents[1] / "sensitivity" / "vit-groups.yaml"
    parser = build_parser()
    args = _from_yaml(str(path), parser.parse_args([str(path)]), parser)
    mode, groups = resolve_groups(find_layers(zoo.fashion_vit(pretrained=False)), args.groups)
    assert mode == "custom"
    assert {g.layer: len(g.members) for g in groups} == {"patch.weight": 1, "attn_early": 8, "mlp_early": 4,
                                                         "attn_late": 8, "mlp_late": 4}


def test_group_sweeps_on_the_ray_executor_are_one_line_before_any_work(tmp_path):
    """Ray workers run per-layer trials only: a grouped sweep there is refused before Ray is even imported."""
    code, out, err = _sweep(tmp_path / "out", "--groups", "role", "--executor", "ray", "--address", "127.0.0.1:1")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not run by the Ray executor" in err and "--groups layer" in err
    assert not (tmp_path / "out" / "sweep.json").exists()
