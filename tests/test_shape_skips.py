"""A global/op-type spec whose group or block size does not divide some weights leaves them in fp16 (as
coremltools skips them) and names them all; the same spec named for such a layer is refused."""
from __future__ import annotations

import json

import pytest
import torch

from coreml_opt.model.package import load_package
from coreml_opt.plan import Plan

from conftest import run_cli


class _Odd(torch.nn.Module):
    """conv 3->32, conv 32->24 (24 output channels: g16 does not divide), conv 24->32, linear 32->80."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.b = torch.nn.Conv2d(32, 24, 3, padding=1)
        self.c = torch.nn.Conv2d(24, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 80)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def odd_package(tmp_path_factory):
    from coreml_opt.model.convert import convert

    path = tmp_path_factory.mktemp("odd") / "odd.mlpackage"
    convert(_Odd().eval(), (1, 3, 8, 8), target="iOS18", output_path=path)
    return path


def _const_of(package, torch_name: str) -> str:
    inventory = load_package(package, load_weights=False).inventory
    return next(w.name for w in inventory.weights if w.torch_name == torch_name)


def test_global_group_spec_leaves_misfits_fp16_and_names_them(odd_package, tmp_path):
    out = tmp_path / "o.mlpackage"
    code, stdout, stderr = run_cli("compress", str(odd_package), "--spec", "pal4/g16", "-o", str(out), "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    b = _const_of(odd_package, "b.weight")
    assert list(report["skipped"]) == [b]
    assert "group size 16 does not divide output-channel dim 24" in report["skipped"][b]
    after = load_package(out, load_weights=False).inventory.by_name()
    assert not after[b].is_compressed
    assert after[_const_of(odd_package, "c.weight")].is_compressed
    assert report["bytes_predicted"] == report["bytes_after"]  # the byte model counts the skipped layer as fp16

    code, stdout, _ = run_cli("compress", str(odd_package), "--spec", "pal4/g16", "-o", str(tmp_path / "p.mlpackage"))
    assert code == 0
    assert f"left {b} in fp16, as coremltools would: pal4/g16: group size 16" in stdout


def test_op_type_spec_skips_and_named_layer_is_refused(odd_package, tmp_path):
    inventory = load_package(odd_package, load_weights=False).inventory
    b = _const_of(odd_package, "b.weight")
    c = _const_of(odd_package, "c.weight")
    resolved, skipped = Plan.from_dict({"op_types": {"conv": "int4/block16"}}).resolve_with_skips(inventory)
    assert list(skipped) == [c] and "block size 16 does not divide input-channel dim 24" in skipped[c]
    assert resolved[c].is_none and not resolved[b].is_none
    plan = tmp_path / "plan.yaml"
    plan.write_text("global: int8\nlayers:\n  b: pal4/g16\n")
    out = tmp_path / "o.mlpackage"
    code, stdout, stderr = run_cli("compress", str(odd_package), "-c", str(plan), "-o", str(out))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "group size 16 does not divide output-channel dim 24" in lines[0], stderr
    assert not out.exists()
