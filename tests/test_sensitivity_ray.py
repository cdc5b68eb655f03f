"""The Ray executor (`--executor ray`): the same trials and values as a local sweep, the same store (a sweep resumes
across executors), a lost worker node's trials re-run with none lost or stored twice; bad input is one line.

The cluster tests start their own Ray cluster (a head with no CPUs and one 1-CPU worker node on 127.0.0.1, see
ray_cluster.py) and kill exactly its processes at the end; they skip when Ray is absent (`pip install -e ".[ray]"`).
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from coreml_opt.errors import CoreMLOptError, ModelError
from coreml_opt.sensitivity import STORE_NAME, analyse

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8", "--data", "calibration_data/digits",
         "--metric", "kl", "--candidates", "int8,pal4,pal2", "--no-progress"]
CLI = [sys.executable, "-m", "coreml_opt.sensitivity"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRIALS = 15  # 5 layers x 3 candidates

try:
    import ray  # noqa: F401
    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='Ray is not installed (pip install -e ".[ray]"; .ci/run does)')


def sweep(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def rows(out: Path) -> list[tuple[str, str, float]]:
    """Every stored (layer, spec, value) of a sweep folder's store, duplicates included."""
    with sqlite3.connect(str(out / STORE_NAME), timeout=5) as db:
        return sorted(db.execute("SELECT layer, spec, value FROM trials"))


def trials(out: Path) -> list[tuple]:
    return [(t["layer"], t["spec"], t["bytes"], t["metric"], t["drop"]) for t in json.loads((out / "trials.json").read_text())]


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """`python -m coreml_opt.sensitivity ARGV` in-process: (exit code, stderr)."""
    from coreml_opt.sensitivity.__main__ import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def _stored(out: Path) -> int:
    """How many trials the store holds (0 before the sweep has made it)."""
    if not (out / STORE_NAME).exists():
        return 0
    try:
        return len(rows(out))
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


# ---- without a cluster --------------------------------------------------------------------------------------------
def test_executor_ray_without_ray_installed_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    """Ray hidden from the interpreter (as on a machine without the extra): one line, nothing written."""
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is absent
    line = one_error_line(*run_main(capsys, *SWEEP, "--out", str(out), "--executor", "ray"))
    assert "--executor ray" in line and "not installed" in line and 'pip install -e ".[ray]"' in line
    assert not out.exists()


@needs_ray
def test_unreachable_address_is_one_line(tmp_path, capsys):
    from ray_cluster import free_port

    out = tmp_path / "out"
    address = f"127.0.0.1:{free_port()}"
    line = one_error_line(*run_main(capsys, *SWEEP, "--out", str(out), "--executor", "ray", "--address", address))
    assert f"--address {address}" in line and "not reachable" in line and "ray start --head" in line
    assert not (out / "trials.json").exists()


def test_address_without_the_ray_executor_and_an_unknown_executor_are_refused(tmp_path, capsys):
    code, err = run_main(capsys, *SWEEP, "--address", "127.0.0.1:6379")
    assert code == 2 and "--address is for --executor ray" in err
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
                                          "executor": "dask"}))
    line = one_error_line(*run_main(capsys, str(sweep_file)))
    assert "executor" in line and "'dask'" in line and "'ray'" in line


def test_ray_executor_refuses_python_objects_a_worker_cannot_load_by_name():
    """Workers load the model and data by name, never pickled tensors: a module object is refused in one error."""
    pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')
    from coreml_opt.zoo import DigitsCNN

    with pytest.raises(ModelError, match="Ray workers load the model by name"):
        analyse(DigitsCNN(), [1, 1, 8, 8], "calibration_data/digits", metric="kl", executor="ray")
    with pytest.raises(CoreMLOptError, match="Ray workers load the metric by name"):
        analyse("coreml_opt.zoo:digits_cnn", [1, 1, 8, 8], None, metric=lambda m: 0.0, executor="ray")
    with pytest.raises(CoreMLOptError, match="is not one of"):
        analyse("coreml_opt.zoo:digits_cnn", [1, 1, 8, 8], "calibration_data/digits", executor="threads")


# ---- on a local cluster -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) and one 1-CPU worker node on 127.0.0.1, started here and killed at the end whatever happens."""
    if not HAVE_RAY:
        pytest.skip('Ray is not installed (pip install -e ".[ray]"; .ci/run does)')
    from ray_cluster import LocalRayCluster

    ray_cluster = LocalRayCluster()
    try:
        ray_cluster.add_worker()
        yield ray_cluster
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    """The digits sweep run locally: the trials every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    done = sweep(*SWEEP, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(trials(out)) == TRIALS
    return out


@pytest.mark.slow  # starts a Ray cluster (~20 s) and its workers import torch and coremltools
def test_ray_sweep_from_a_sweep_file_matches_the_local_sweep_bit_for_bit(cluster, local_reference, tmp_path):
    """`executor:`/`address:` in a sweep file; a sweep started locally (--max-trials) is finished on the cluster."""
    out = tmp_path / "sweep"
    started = sweep(*SWEEP, "--out", str(out), "--max-trials", "4")  # an interrupted local sweep
    assert started.returncode == 3, started.stderr[-3000:]
    sweep_file = tmp_path / "digits-ray.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8], "data": str(ROOT / "calibration_data/digits"),
        "metric": "kl", "candidates": ["int8", "pal4", "pal2"], "out": "sweep", "executor": "ray",
        "address": cluster.address}))
    done = sweep(str(sweep_file), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "11 run now, 4 from the store, 0 pending" in done.stdout
    assert trials(out) == trials(local_reference)  # same metric values, bit for bit
    assert rows(out) == rows(local_reference)


@pytest.mark.slow
def test_ray_package_sweep_matches_the_local_package_sweep(cluster, example_mlpackage, tmp_path):
    """The package sweep's workers read the .mlpackage by its path: same values as the local package sweep."""
    options = ["--model", str(example_mlpackage), "--data", "calibration_data/digits", "--metric", "kl",
               "--candidates", "int8,pal2", "--no-progress"]
    local = sweep(*options, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    distributed = sweep(*options, "--out", str(tmp_path / "ray"), "--executor", "ray", "--address", cluster.address)
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    assert trials(tmp_path / "ray") == trials(tmp_path / "local") and len(trials(tmp_path / "local")) == 10


@pytest.mark.slow
def test_killed_worker_node_mid_sweep_then_rerun_loses_and_duplicates_no_trial(cluster, local_reference, tmp_path):
    """The worker node is SIGKILLed after the first rows are stored (the driver then waits for a node and is killed
    too); with a new worker node the rerun finishes: every trial stored once, values equal to the local sweep's,
    and a local rerun finds them all in the store."""
    out = tmp_path / "sweep"
    # The digits CNN with a 0.3 s sleep in its last layer's forward (values unchanged): a sweep slow enough to kill
    # the node in while trials are running.
    argv = [*SWEEP, "--out", str(out), "--executor", "ray", "--address", cluster.address]
    argv[argv.index("coreml_opt.zoo:digits_cnn")] = "tests/ray_models.py:slow_digits_cnn"
    driver = subprocess.Popen([*CLI, *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while driver.poll() is None and time.time() < deadline and not _stored(out):
            time.sleep(0.05)
        cluster.kill_worker(cluster.workers[0])  # a lost machine, mid-sweep
        time.sleep(2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the interrupted driver
        driver.wait()
    before = rows(out)
    assert 1 <= len(before) < TRIALS, f"the kill landed mid-sweep ({len(before)} of {TRIALS} stored)"

    cluster.add_worker()
    rerun = sweep(*argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{TRIALS - len(before)} run now, {len(before)} from the store, 0 pending" in rerun.stdout
    assert rows(out) == rows(local_reference)  # no trial lost or stored twice, the same values
    assert trials(out) == trials(local_reference)
    local = sweep(*SWEEP, "--out", str(out))  # resumes locally: nothing left to run
    assert local.returncode == 0 and f"0 run now, {TRIALS} from the store" in local.stdout, local.stderr[-3000:]




@pytest.mark.slow
def test_lost_worker_node_trials_rerun_on_a_new_node_by_the_same_driver(cluster, local_reference, tmp_path):
    """The worker node is SIGKILLed mid-sweep and a new one joins: Ray restarts the actor there and reruns the
    batches it held, and the same driver finishes the sweep with every trial stored once."""
    out = tmp_path / "sweep"
    argv = [*SWEEP, "--out", str(out), "--executor", "ray", "--address", cluster.address]
    argv[argv.index("coreml_opt.zoo:digits_cnn")] = "tests/ray_models.py:slow_digits_cnn"
    driver = subprocess.Popen([*CLI, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while driver.poll() is None and time.time() < deadline and not _stored(out):
            time.sleep(0.05)
        cluster.kill_worker(cluster.workers[0])  # a lost machine, mid-sweep
        lost_at = len(rows(out))
        cluster.add_worker()  # another machine joins
        stdout, stderr = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert 1 <= lost_at < TRIALS, f"the kill landed mid-sweep ({lost_at} of {TRIALS} stored)"
    assert driver.returncode == 0, stderr[-3000:]
    assert f"{TRIALS} run now, 0 from the store, 0 pending" in stdout
    assert rows(out) == rows(local_reference) and trials(out) == trials(local_reference)


@pytest.mark.slow
def test_a_factory_that_loads_other_weights_on_a_worker_is_one_line_and_stores_nothing(cluster, tmp_path):
    """Workers check that what they loaded hashes to the driver's store key: an unseeded factory gives other weights
    on each worker, which would put another model's values under this model's key."""
    out = tmp_path / "sweep"
    argv = [*SWEEP, "--out", str(out), "--executor", "ray", "--address", cluster.address]
    argv[argv.index("coreml_opt.zoo:digits_cnn")] = "tests/ray_models.py:unseeded_digits_cnn"
    done = sweep(*argv)
    line = one_error_line(done.returncode, done.stderr)
    assert "tests/ray_models.py:unseeded_digits_cnn" in line and "other model weights on a Ray worker" in line
    assert "seeded" in line and _stored(out) == 0 and not (out / "trials.json").exists()
