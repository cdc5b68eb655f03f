"""`--measure`: the emitted package run by the package runtime, reported next to the simulated figure."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

DATA = "calibration_data/digits"


@pytest.mark.parametrize("spec", ["pal2", "int4/block32"])
def test_compress_measure_equals_the_simulated_figure_and_differs_from_the_reference(example_mlpackage, tmp_path,
                                                                                     spec):
    out = tmp_path / "c.mlpackage"
    code, stdout, stderr = run_cli("compress", str(example_mlpackage), "--spec", spec, "-o", str(out),
                                   "--measure", "--data", DATA, "--metric", "kl", "--json")
    assert code == 0, stderr
    measured = json.loads(stdout)["measured"]
    assert measured["metric_name"] == "kl" and measured["reference"] == 0.0
    assert measured["measured"] > 0.0  # the compressed package, not the input, was run
    assert measured["measured"] == measured["simulated"]  # simulation == what the package computes
    assert measured["drop"] == pytest.approx(measured["measured"])


def test_compress_measure_prints_both_figures(example_mlpackage, tmp_path):
    code, stdout, stderr = run_cli("compress", str(example_mlpackage), "--spec", "pal2", "-o",
                                   str(tmp_path / "c.mlpackage"), "--measure", "--data", DATA)
    assert code == 0, stderr
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("accuracy measured on the package (fp32 runtime) ") and ", simulated " in line
    assert "; reference " in line and ", drop " in line


def test_compress_measure_refusals_are_one_line_and_write_nothing(example_mlpackage, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
    out = tmp_path / "c.mlpackage"
    for extra, words in ((["--measure"], "--measure: needs evaluation data"),
                         (["--data", DATA], "--data: is used only with --measure"),
                         (["--measure", "--data", str(tmp_path / "d.npz")], "holds inputs of shape [3, 8, 8]")):
        code, _, stderr = run_cli("compress", str(example_mlpackage), "--spec", "int8", "-o", str(out), *extra)
        assert code == 2 and words in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not out.exists()
