"""Memory-bounded sweeps (``--memory``): cut activations past the budget spill to disk or start from the nearest
earlier cut, with every trial's metric identical to an unbounded sweep."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from coreml_opt.evaluation import run_batches
from coreml_opt.model.convert import fold_batchnorm
from coreml_opt.sensitivity import analyse
from coreml_opt.sensitivity.__main__ import main
from coreml_opt.sensitivity.layers import fp16_copy
from coreml_opt.sensitivity.memory import model_bytes, rss_bytes, tensor_bytes
from coreml_opt.sensitivity.suffix import SuffixRunner

SHAPE = (1, 3, 32, 32)
LAYERS = ["2.weight", "4.weight", "6.weight"]  # each cut holds 128 x 32 x 32 x 32 fp32 values: 16 MiB


def wide_cnn() -> nn.Module:
    """Four 32-channel 3x3 convs at 32x32: small weights (37 KiB), large activations (16 MiB a cut for 128 inputs)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))


KW = dict(metric="kl", candidates="int8,pal2", progress=False, batch_size=8)


@pytest.fixture(scope="module")
def unbounded(data):
    return analyse(wide_cnn(), SHAPE, data, **KW)


def _evaluations(caplog) -> dict[str, int]:
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("trial evaluations:"))
    found = re.search(r"(\d+) from cuts in memory, (\d+) from cuts on disk, (\d+) from the nearest earlier cut, "
                      r"(\d+) full forward", line)
    return dict(zip(("memory", "disk", "nearest", "full"), map(int, found.groups())))


def test_sweep_under_a_few_mb_budget_spills_cuts_and_keeps_every_metric(unbounded, data, caplog):
    # 48 MiB of cut activations; the budget leaves the cache about 24 MiB above the process, model and data
    assert [layer.layer for layer in unbounded.layers] == LAYERS
    caplog.set_level(logging.INFO, logger="coreml_opt.sensitivity")
    bounded = analyse(wide_cnn(), SHAPE, data, memory=rss_bytes(collect=True) + (24 << 20), **KW)
    assert [(t.layer, t.spec, t.metric) for t in bounded.trials] == [(t.layer, t.spec, t.metric)
                                                                    for t in unbounded.trials]
    assert len({t.metric for t in bounded.trials}) == 6
    counts = _evaluations(caplog)
    assert counts["disk"] >= 2 and counts["full"] == 0 and sum(counts.values()) == 6


def test_uncached_cut_runs_the_suffix_of_the_nearest_earlier_cut(data):
    base = fp16_copy(fold_batchnorm(wide_cnn()))
    batches = [data[:64], data[64:]]
    expected = run_batches(base, batches)
    # room for the first cut in memory, none on disk: the later layers start from the first cut
    runner = SuffixRunner(base, {name: (name,) for name in LAYERS}, max_cache_bytes=16 << 20, spill_bytes=0)
    runner.prepare(batches, expected)
    assert runner.placement() == {"2.weight": "memory", "4.weight": "nearest:2.weight",
                                  "6.weight": "nearest:2.weight"}
    with torch.no_grad():
        base.get_parameter("6.weight").mul_(0.5)  # a trial's changed weight reaches the outputs
        changed = run_batches(base, batches)
        for name in LAYERS:
            assert all(torch.equal(a, b) for a, b in zip(runner.outputs(name), changed))
    assert runner.counts == {"memory": 1, "nearest": 2}


def test_spilled_cuts_are_read_back_bit_identically_and_removed(data):
    base = fp16_copy(fold_batchnorm(wide_cnn()))
    batches = [data[:64], data[64:]]
    expected = run_batches(base, batches)
    runner = SuffixRunner(base, {name: (name,) for name in LAYERS}, max_cache_bytes=0)
    runner.prepare(batches, expected)
    assert set(runner.placement().values()) == {"disk"} and runner.memory_bytes == 0
    assert runner.disk_bytes >= 3 * (16 << 20)
    folder = runner._folder
    assert len(list(folder.iterdir())) == 6  # one file per cut and batch
    for name in LAYERS:
        assert all(torch.equal(a, b) for a, b in zip(runner.outputs(name), expected))
    runner.close()
    assert not folder.exists()


def test_memory_accounting_counts_a_shared_storage_once():
    x = torch.zeros(1000)
    assert tensor_bytes([x[:10], x[500:], x]) == 4000  # views keep the whole storage alive
    assert model_bytes(nn.Linear(10, 10)) == 440


@pytest.mark.parametrize("value", ["8XB", "0", "-1GB", "lots"])
def test_bad_memory_is_one_line_and_exit_2(value, capsys):
    rc = main(["--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8", f"--memory={value}",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"--memory {value!r}" in err[0] and "8GB" in err[0]


def test_budget_below_the_model_and_data_is_one_line_naming_what_it_needs(capsys):
    rc = main(["--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8", "--memory", "1MB",
               "--no-progress", "--candidates", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "memory '1MB'" in err[0] and "raise --memory above" in err[0]


def test_memory_in_a_sweep_file_is_checked_like_the_option(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\nmemory: 8 parsecs\n")
    assert main([str(sweep), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(sweep) in err[0] and "memory '8 parsecs'" in err[0]


def test_bounded_sweep_never_holds_every_candidates_weights(data, caplog):
    # 3 layers x 3 candidates of 36 KiB fp32 weights: the cache is sized to 4 of the largest, not all 9
    caplog.set_level(logging.INFO, logger="coreml_opt.sensitivity")
    analyse(wide_cnn(), SHAPE, data[:16], memory=rss_bytes(collect=True) + (64 << 20),
            **{**KW, "candidates": "int8,int4/block32,pal2"})
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("simulated weights:"))
    held, limit, simulated = re.search(r"at most ([\d.]+) MiB held at once \(limit ([\d.]+) MiB\), (\d+)", line).groups()
    weight_mib = 32 * 32 * 9 * 4 / 2**20
    assert int(simulated) >= 9 and float(limit) <= 4 * weight_mib + 0.01 and float(held) <= float(limit)


SHARED = wide_cnn()


def shared_cnn() -> nn.Module:
    """A factory that returns a module it keeps: a sweep must not fold or round it in place."""
    return SHARED


def test_a_factory_model_held_elsewhere_is_copied_not_rounded_in_place(data):
    before = {k: v.clone() for k, v in SHARED.state_dict().items()}
    analyse(f"{__name__}:shared_cnn", SHAPE, data[:8], memory="4GB", **KW)  # the module pytest imported
    assert all(torch.equal(before[k], v) for k, v in SHARED.state_dict().items())


def test_progress_bars_show_eta_and_rate_per_minute(data, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    analyse(wide_cnn(), SHAPE, data[:16], **{**KW, "progress": True})
    shown = term.getvalue()
    assert re.search(r"activations: +\d+%.*\d+/2 \[.*<.*, [\d.?]+ batches/min\]", shown)
    assert re.search(r"sensitivity: +\d+%.*\d+/6 \[.*<.*, [\d.?]+ trials/min\]", shown)


def test_memory_on_a_package_sweep_is_refused_in_one_line(example_mlpackage, capsys):
    rc = main(["--model", str(example_mlpackage), "--data", "calibration_data/digits", "--memory", "1GB",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--memory" in err[0] and "factory" in err[0]
