"""Prefix/suffix runs of a token-id transformer package with a batch, and runtime faults as one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli
from coreml_opt.errors import RuntimeOpError
from coreml_opt.evaluation import PackageBackend, resolve_data
from coreml_opt.evaluation.data import package_input
from coreml_opt.planning.package import PackageModel, package_evaluator
from coreml_opt.runtime import load_graph
from coreml_opt.sensitivity import analyse_package
from runtime_models import convert_model, encoder


@pytest.fixture(scope="module")
def encoder_package(tmp_path_factory):
    """A 2-layer nn.TransformerEncoder on int32 token ids (1,12), converted by ct.convert, with token data."""
    model, example = encoder()
    folder = tmp_path_factory.mktemp("enc")
    path = convert_model(model, example, folder / "enc.mlpackage")
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    np.savez(folder / "ids.npz", x=ids.numpy())
    return path, ids, folder / "ids.npz"


def test_suffix_from_every_step_equals_the_full_run_of_a_batch(encoder_package):
    """Attention reshapes keep the batch as an inner factor; the prefix cache must carry that to the suffix."""
    path, ids, _ = encoder_package
    backend = PackageBackend(path)
    exe = backend.executable
    for start in (0, len(exe.steps) // 3, len(exe.steps) // 2, 2 * len(exe.steps) // 3):
        cached = exe.run_prefix({backend.port.name: ids}, start)  # decides the batching itself
        if cached is None:
            assert exe.batching in ("vmap", "looped")
            continue
        first = exe.run_suffix(cached, start)[backend.output]
        again = exe.run_suffix(cached, start)[backend.output]  # the cache is reused by every trial
        full = backend(ids)
        assert torch.equal(first, full) and torch.equal(again, full), start


def test_package_sweep_of_a_transformer_with_a_batch_equals_full_runs(encoder_package):
    path, _, data = encoder_package
    kwargs = dict(metric="kl", candidates="int4/block32,pal2", progress=False, batch_size=4, max_trials=8,
                  weight_threshold=256)
    cached = analyse_package(path, str(data), **kwargs)
    full = analyse_package(path, str(data), use_prefix=False, **kwargs)
    assert len({t.layer for t in cached.trials}) >= 3  # layers whose first reader is deep in the graph
    assert [(t.layer, t.spec, t.metric) for t in cached.trials] == [(t.layer, t.spec, t.metric) for t in full.trials]


def test_an_op_that_fails_in_the_runtime_is_one_error_naming_op_and_package(encoder_package):
    path, ids, _ = encoder_package
    backend = PackageBackend(path)
    with pytest.raises(RuntimeOpError) as info:
        backend(ids[:1, :7])  # 7 tokens where the package's reshapes expect 12
    message = str(info.value)
    assert str(path) in message and "op '" in message and "\n" not in message


def test_data_free_package_sweep_feeds_token_ids_below_the_embedding_vocabulary(encoder_package, tmp_path):
    """An int32 port gets seeded token ids < the gather table's rows (50), not floats truncated to id 0."""
    path, _, _ = encoder_package
    spec, vocab = package_input(load_graph(path))
    assert (spec.dtype, vocab) == ("int32", 50)
    tokens = resolve_data(None, spec, vocab=vocab).x
    assert tokens.max() > 1
    np.savez(tmp_path / "tokens.npz", x=tokens.numpy().astype(np.int32))
    kwargs = dict(metric="kl", candidates="pal2", progress=False, max_trials=2, weight_threshold=256)
    free = analyse_package(path, None, **kwargs)
    given = analyse_package(path, str(tmp_path / "tokens.npz"), **kwargs)
    assert [t.metric for t in free.trials] == [t.metric for t in given.trials]


def test_data_free_plan_measurement_of_a_package_feeds_token_ids(encoder_package):
    path, _, _ = encoder_package
    evaluator = package_evaluator(PackageModel(path, []), None, "kl")
    assert evaluator.data.x.dtype == torch.int64 and 1 < int(evaluator.data.x.max()) < 50


@pytest.mark.parametrize("command", ["sensitivity", "eval", "compress"])
def test_runtime_fault_in_a_command_is_one_line_and_writes_nothing(encoder_package, tmp_path, command):
    """Token ids past the 50-row embedding make the runtime's gather fail: exit 2, one line naming the
    package and the op, no traceback, no output."""
    path, _, _ = encoder_package
    data = tmp_path / "big.npz"
    np.savez(data, x=np.full((4, 12), 60, dtype=np.int32))
    out = tmp_path / "out.mlpackage"
    argv = {"sensitivity": ("sensitivity", "--model", str(path), "--data", str(data), "--metric", "kl",
                            "--candidates", "pal2", "--max-trials", "1", "--out", str(tmp_path / "s")),
            "eval": ("eval", str(path), "--data", str(data), "--metric", "kl", "--reference", str(path)),
            "compress": ("compress", str(path), "--spec", "int8", "--out", str(out), "--measure", "--data",
                         str(data), "--metric", "kl")}[command]
    code, stdout, stderr = run_cli(*argv)
    assert code == 2 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0] and "'gather'" in lines[0] and "token ids" in lines[0]
    assert not out.exists()
