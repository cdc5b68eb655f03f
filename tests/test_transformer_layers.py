"""Transformer weights that are not an nn.Linear's `.weight`: nn.MultiheadAttention's projections are
bare parameters that Core ML reads with `linear`; sweeps, plans and packages must all see them."""
from __future__ import annotations

import json

import torch
from torch import nn

from coreml_opt.sensitivity.layers import find_layers
from tests.conftest import run_cli


class _Encoder(nn.Module):
    """An embedding (Linear 64->64 for float features, or a 500x64 table for token ids), one stock
    TransformerEncoderLayer (fused in_proj_weight (192,64)) and a head."""

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, 64) if tokens else nn.Linear(64, 64)
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))


def encoder() -> nn.Module:
    """Seeded factory (``tests/test_transformer_layers.py:encoder``) so the plan re-measures the same model."""
    torch.manual_seed(0)
    return _Encoder().eval()


def test_multihead_attention_projections_are_linear_layers():
    layers = {layer.layer: layer for layer in find_layers(encoder())}
    fused = layers["layer.self_attn.in_proj_weight"]
    assert (fused.op_type, fused.shape, fused.coreml_name) == (
        "linear", (192, 64), "layer_self_attn_in_proj_weight_to_fp16")
    # different key/value sizes: separate q/k/v projections, each a layer of its own
    cross = nn.MultiheadAttention(64, 4, kdim=96, vdim=96, batch_first=True)
    assert [(layer.layer, layer.shape) for layer in find_layers(cross)] == [
        ("q_proj_weight", (64, 64)), ("k_proj_weight", (64, 96)), ("v_proj_weight", (64, 96)),
        ("out_proj.weight", (64, 64))]


def _sweep(tmp_path, factory: str, input_args: tuple[str, ...], candidates: str) -> tuple:
    """Run a kl sweep of this file's ``factory`` through the CLI; (output folder, trial rows)."""
    sens = tmp_path / "sens"
    code, out, err = run_cli("sensitivity", "--model", f"{__file__}:{factory}", *input_args, "--metric", "kl",
                             "--candidates", candidates, "--out", str(sens), "--no-progress")
    assert code == 0, err
    trials = json.loads((sens / "trials.json").read_text())
    return sens, trials["trials"] if isinstance(trials, dict) else trials


def test_encoder_layer_sweeps_plans_and_emits_its_attention_weights(tmp_path):
    from coreml_opt.model.convert import convert

    package = tmp_path / "enc.mlpackage"
    convert(encoder(), (1, 16, 64), target="iOS18", output_path=package)
    sens, trials = _sweep(tmp_path, "encoder", ("--input-shape", "1,16,64"), "int4/block32,pal4/g16,pal2")
    assert {t["spec"] for t in trials if t["layer"] == "layer.self_attn.in_proj_weight"} == {
        "int4/block32", "pal4/g16", "pal2"}
    code, out, err = run_cli("plan", str(sens), "--bpw", "4", "--json", "--emit", str(tmp_path / "enc-4bpw.mlpackage"),
                             "--model-package", str(package))
    assert code == 0, err
    result = json.loads(out)
    assert result["emitted_bytes"] == result["bytes"] and result["bits_per_weight"] <= 4.0
    assert result["layers"]["layer.self_attn.in_proj_weight"] in {"int4/block32", "pal4/g16", "pal2"}


def token_encoder() -> nn.Module:
    """Seeded factory (``tests/test_transformer_layers.py:token_encoder``): token ids (N,16) -> logits."""
    torch.manual_seed(0)
    return _Encoder(tokens=True).eval()


def test_datasets_keep_integer_inputs_integer():
    import numpy as np

    from coreml_opt.data import Dataset

    ids = Dataset(np.array([[1, 2], [499, 0]], dtype=np.int32))
    assert ids.x.dtype == torch.int64 and ids.x.tolist() == [[1, 2], [499, 0]]
    assert Dataset(np.zeros((2, 3), dtype=np.uint8)).x.dtype == torch.int64
    assert Dataset(np.zeros((2, 3), dtype=np.float64)).x.dtype == torch.float32


def test_token_id_model_sweeps_plans_and_emits_with_its_integer_input(tmp_path):
    sens, trials = _sweep(tmp_path, "token_encoder", ("--input", "ids:1,16:int32"), "pal4,int4/block32,pal2")
    sweep = json.loads((sens / "sweep.json").read_text())
    assert sweep["inputs"] == ["ids:1,16:int32"]
    assert {row["layer"]: row["op_type"] for row in sweep["layers"]}["embed.weight"] == "gather"
    assert {t["spec"] for t in trials if t["layer"] == "embed.weight"} == {"pal4", "int4/block32", "pal2"}
    # no --model-package: the plan converts the swept model itself, declaring the int32 input
    code, out, err = run_cli("plan", str(sens), "--bpw", "4", "--json", "--emit", str(tmp_path / "tok.mlpackage"))
    assert code == 0, err
    result = json.loads(out)
    assert result["emitted_bytes"] == result["bytes"] and result["bits_per_weight"] <= 4.0
    assert result["measured_metric"] is not None
    from coreml_opt.model.package import load_package

    spec = load_package(tmp_path / "tok.mlpackage").mlmodel.get_spec()
    assert [(i.name, i.type.multiArrayType.dataType) for i in spec.description.input] == [("ids", 131104)]  # INT32


def encoder_inputs() -> torch.Tensor:
    """Seeded evaluation inputs (64, 16, 64) for the encoder's workflow."""
    return torch.rand(64, 16, 64, generator=torch.Generator().manual_seed(1))


def _workflow(tmp_path, stages: str) -> str:
    path = tmp_path / "enc.yaml"
    path.write_text(f"name: enc\nmodel: {__file__}:encoder\ninput_shape: [1, 16, 64]\ntarget: iOS18\n"
                    f"plan: {{global: pal4}}\neval: {{data: {__file__}:encoder_inputs, metric: kl}}\n"
                    f"stages:\n{stages}out: {tmp_path / 'out'}\n")
    return str(path)


def test_workflow_data_free_compresses_attention_projections(tmp_path):
    code, out, err = run_cli("run", _workflow(tmp_path, "  - data_free: {}\n"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["name"] == "data_free")
    assert stage["status"] == "ok"
    from coreml_opt.model.package import load_package

    weights = {w.torch_name: w for w in load_package(tmp_path / "out" / "data_free.mlpackage").inventory.weights}
    assert weights["layer.self_attn.in_proj_weight"].is_compressed


def test_workflow_torch_stage_refuses_attention_projections_in_one_line(tmp_path):
    stages = "  - data_free: {}\n  - calibration: {method: skm, data: " + f"{__file__}:encoder_inputs" + "}\n"
    code, out, err = run_cli("run", _workflow(tmp_path, stages))
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (conversion progress aside)
    assert code == 2 and len(errors) == 1, err
    assert "layer.self_attn.in_proj_weight" in errors[0] and "data_free" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "data_free.mlpackage").exists()  # refused before any stage ran


def cloned_stack() -> nn.Module:
    """An untrained nn.TransformerEncoder: its two layers are deep copies, equal in every weight."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def test_sweep_refuses_layers_core_ml_would_store_as_one(tmp_path):
    code, out, err = run_cli("sensitivity", "--model", f"{__file__}:cloned_stack", "--input-shape", "1,16,64",
                             "--metric", "kl", "--candidates", "pal4", "--out", str(tmp_path / "sens"),
                             "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'layers.0.self_attn.in_proj_weight' and 'layers.1.self_attn.in_proj_weight'" in err
    assert "initialise each layer separately" in err and not (tmp_path / "sens" / "sweep.json").exists()
