""".ci/run installs what the tests need before the README's test command, runs the slow tests after it, and fails
when either fails; the tests themselves install nothing. Checked by running .ci/run against stub commands."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real tools .ci/run and the README's command use; everything else on PATH is a stub that logs its arguments.
TOOLS = ("bash", "grep", "dirname", "mkdir")
INSTALLS = re.compile(r"""["']apt-get["']|["']apt["']\s*,\s*["']install|["']pip["']\s*,\s*["']install|"""
                      r"""-m\s+pip\s+install|ensurepip""")


def stub(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\necho \"{path.name} $*\" >> \"$CI_LOG\"\n{body}\n")
    path.chmod(0o755)


def run_ci(tmp_path: Path, *, chromium: bool = False, apt_rc: int = 0, default_rc: int = 0,
           slow_rc: int = 0, pip_rc: int = 0) -> tuple[int, list[str], str]:
    """Run a copy of .ci/run in a repository holding the real README's test command; (exit code, log, stderr)."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    bin_dir.mkdir()
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    shutil.copy(ROOT / "README.md", repo / "README.md")
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    stub(bin_dir / "id", "echo 0")
    stub(bin_dir / "apt-get", f"exit {apt_rc}")
    stub(bin_dir / "python3", 'mkdir -p .venv/bin && : > .venv/bin/activate')
    stub(bin_dir / "pip", f'case "$*" in *"[ray]"*) exit {pip_rc};; *) exit 0;; esac')
    stub(bin_dir / "python", f'case "$*" in *"-m slow"*) exit {slow_rc};; *) exit {default_rc};; esac')
    if chromium:
        stub(bin_dir / "chromium", "exit 0")
    log = tmp_path / "log"
    log.touch()
    env = {"PATH": str(bin_dir), "CI_LOG": str(log), "HOME": str(tmp_path)}
    done = subprocess.run([shutil.which("bash"), str(repo / ".ci" / "run")], env=env, capture_output=True,
                          text=True, timeout=60)
    return done.returncode, log.read_text().splitlines(), done.stderr


@pytest.fixture(autouse=True)
def needs_tools():
    if not all(shutil.which(t) for t in TOOLS):
        pytest.skip(f"needs {', '.join(TOOLS)} on PATH")


def test_chromium_is_installed_before_the_readme_command_then_slow_tests_run(tmp_path):
    code, log, _ = run_ci(tmp_path)
    assert code == 0
    calls = [" ".join(line.split()[:2]) for line in log if line.startswith(("apt-get", "python"))]
    assert calls[:3] == ["apt-get update", "apt-get install", "python3 -m"]  # the browser first, then the README's
    assert log.index("python -m pytest -q") < log.index("python -m pytest -q -m slow")
    assert log[-1] == "python -m pytest -q -m slow"


def test_present_browser_is_not_reinstalled_and_a_failed_install_is_tolerated(tmp_path):
    code, log, _ = run_ci(tmp_path / "present", chromium=True)
    assert code == 0 and not any(line.startswith("apt-get") for line in log)
    code, log, err = run_ci(tmp_path / "failing", apt_rc=100)
    assert code == 0 and "could not install chromium" in err and "python -m pytest -q -m slow" in log


@pytest.mark.parametrize("default_rc, slow_rc, expected", [(0, 5, 0), (0, 1, 1), (1, 0, 1), (2, 0, 2)])
def test_either_step_failing_fails_ci_and_no_slow_tests_is_not_a_failure(tmp_path, default_rc, slow_rc, expected):
    code, log, _ = run_ci(tmp_path, chromium=True, default_rc=default_rc, slow_rc=slow_rc)
    assert code == expected
    assert ("python -m pytest -q -m slow" in log) == (default_rc == 0)  # a failed default run stops CI


@pytest.mark.parametrize("pip_rc", [0, 1])
def test_ray_extra_is_installed_into_the_venv_before_the_readme_command_and_a_failure_is_tolerated(tmp_path, pip_rc):
    code, log, err = run_ci(tmp_path, chromium=True, pip_rc=pip_rc)
    assert code == 0 and "python -m pytest -q -m slow" in log
    ray = log.index('pip install -e .[ray]')
    assert log[ray - 1].startswith("python3 -m venv .venv") and ray < log.index("python -m pytest -q")
    assert ("could not install the ray extra" in err) == bool(pip_rc)


def test_no_test_installs_anything():
    """Installing belongs in .ci/run: no test module runs apt-get or pip install (test_report.py used to)."""
    offenders = [f"{path.name}:{n}" for path in sorted((ROOT / "tests").glob("*.py")) if path.name != "test_ci.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if INSTALLS.search(line)]
    assert offenders == []
