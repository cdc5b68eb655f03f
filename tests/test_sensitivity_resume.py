"""The results store: resume after SIGKILL, only new trials on rerun, no stale rows; bad input is one line."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from coreml_opt import zoo
from coreml_opt.errors import CoreMLOptError
from coreml_opt.sensitivity import DEFAULT_LADDER, STORE_NAME, analyse, load_sweep
from coreml_opt.sensitivity.__main__ import main
from coreml_opt.sensitivity.examples import digits_heldout

SHAPE = (1, 1, 8, 8)
ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "coreml_opt.sensitivity", "--model", "coreml_opt.zoo:digits_cnn", "--input-shape",
       "1,1,8,8", "--data", "coreml_opt.sensitivity.examples:digits_heldout", "--metric", "psnr", "--no-progress"]


def _rows(store: Path) -> dict[tuple[str, str], tuple[float, float]]:
    if not store.exists():
        return {}
    try:
        with sqlite3.connect(str(store), timeout=5) as db:
            return {(l, s): (v, c) for l, s, v, c in db.execute("SELECT layer, spec, value, created FROM trials")}
    except sqlite3.OperationalError:  # table not created yet
        return {}


def _key(trials) -> list[tuple]:
    return [(t.layer, t.spec, t.bytes, t.metric, t.drop) for t in trials]


@pytest.mark.slow  # a whole sweep in a subprocess, killed, then resumed
def test_sigkilled_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*CLI, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while len(_rows(out / STORE_NAME)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = _rows(out / STORE_NAME)
    total = 35  # the calibrated default ladder (with --data): 7 rungs on each of 5 conv/linear layers
    assert proc.returncode == -signal.SIGKILL and 3 <= len(before) < total, "kill landed mid-sweep"
    assert not (out / "trials.json").exists()

    rerun = subprocess.run([*CLI, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{total - len(before)} run now, {len(before)} from the store" in rerun.stdout
    after = _rows(out / STORE_NAME)
    assert len(after) == total
    assert all(after[k] == v for k, v in before.items())  # same rows, same timestamps: not rerun
    _, resumed = load_sweep(out)
    fresh = analyse("coreml_opt.zoo:digits_cnn", SHAPE, digits_heldout(), metric="psnr", progress=False)
    assert _key(resumed) == _key(fresh.trials)


def test_rerun_with_one_more_candidate_runs_only_new_trials(tmp_path):
    model, data = zoo.digits_cnn(), digits_heldout()
    first = analyse(model, SHAPE, data, metric="top1", candidates="int8,pal2", out_dir=tmp_path, progress=False,
                    max_trials=4)
    assert (first.ran, first.pending, first.complete) == (4, 6, False)
    assert len(load_sweep(tmp_path)[1]) == 4  # partial results are saved
    second = analyse(model, SHAPE, data, metric="top1", candidates="int8,pal2", out_dir=tmp_path, progress=False)
    assert (second.ran, second.reused, second.complete) == (6, 4, True)
    third = analyse(model, SHAPE, data, metric="top1", candidates="int8,pal2,prune50", out_dir=tmp_path,
                    progress=False)
    assert (third.ran, third.reused) == (5, 10)
    assert _key(third.trials)[:2] == _key(second.trials)[:2]


def test_changed_model_never_reuses_rows(tmp_path):
    model, data = zoo.digits_cnn(), digits_heldout()
    analyse(model, SHAPE, data, metric="top1", candidates="pal2", out_dir=tmp_path, progress=False)
    with torch.no_grad():
        model = zoo.digits_cnn()
        model.classifier[0].weight[0, 0] += 0.5
    changed = analyse(model, SHAPE, data, metric="top1", candidates="pal2", out_dir=tmp_path, progress=False)
    assert (changed.ran, changed.reused) == (5, 0)
    other_metric = analyse(model, SHAPE, data, metric="cosine", candidates="pal2", out_dir=tmp_path,
                           progress=False)
    assert other_metric.reused == 0


def test_time_budget_stops_cleanly_with_partial_results(tmp_path):
    result = analyse(zoo.digits_cnn(), SHAPE, digits_heldout(), metric="top1", out_dir=tmp_path, progress=False,
                     time_budget=0.0, candidates=list(DEFAULT_LADDER))
    assert result.ran == 0 and result.pending == 30 and (tmp_path / "sweep.json").is_file()


def _cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


@pytest.fixture
def bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(broken / "0000.png")
    (broken / "0001.png").write_bytes(b"not a png")
    return empty, broken


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, bad_folders):
    empty, broken = bad_folders
    base = ["--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8", "--no-progress"]
    cases = {
        "no_such.module:fn": [*base, "--metric", "no_such.module:fn"],
        "contains no images": [*base, "--data", str(empty)],
        "not a readable image": [*base, "--data", str(broken)],
        "fails on an example input": ["--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,3,8,8"],
        "needs iOS18": [*base, "--candidates", "int8,int4/block32", "--target", "iOS16"],
    }
    for expected, argv in cases.items():
        out = tmp_path / expected.replace(" ", "_").replace(":", "_")
        code, err = _cli(*argv, "--out", str(out))
        assert code == 2 and expected in err, (expected, err)
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert not out.exists(), f"{expected}: output directory was written"


def test_default_ladder_is_filtered_to_the_target_and_reported():
    result = analyse(zoo.digits_cnn(), SHAPE, None, metric="top1", target="iOS16", progress=False,
                     max_trials=0)
    assert result.candidates == [s for s in DEFAULT_LADDER if s != "int4/block32"]
    assert result.skipped_candidates == [{"spec": "int4/block32", "reason": "needs iOS18, target is iOS16"}]
    # with data the default is each kind's calibrated ladder: grouped-channel LUTs need iOS18
    calibrated = analyse(zoo.digits_cnn(), SHAPE, digits_heldout(), metric="top1", target="iOS16", progress=False,
                         max_trials=0)
    assert "int8+bc" in calibrated.candidates and "pal4+gptq+bc" in calibrated.candidates
    assert {"spec": "pal4/g8+gptq+bc", "reason": "needs iOS18, target is iOS16"} in calibrated.skipped_candidates
    with pytest.raises(CoreMLOptError, match="needs iOS18"):
        analyse(zoo.digits_cnn(), SHAPE, None, candidates="pal4/g16", target="iOS17")


def test_fast_kmeans_sweep_never_reuses_exact_rows_and_the_planner_keeps_the_mode(tmp_path):
    from coreml_opt.planning import PlanningSession
    from coreml_opt.sensitivity import analyse
    from coreml_opt.sensitivity.examples import digits_heldout

    common = dict(metric="kl", candidates=["pal2"], out_dir=tmp_path, progress=False)
    exact = analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), digits_heldout(), **common)
    fast = analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), digits_heldout(), kmeans="fast", **common)
    assert exact.ran == len(exact.trials) and fast.reused == 0 and fast.ran == len(fast.trials)
    assert [t.metric for t in exact.trials] != [t.metric for t in fast.trials]  # other palettes, other drops
    session = PlanningSession.open(tmp_path)
    assert session.kmeans == "fast" and session.plan(bpw=6).plan.kmeans == "fast"
