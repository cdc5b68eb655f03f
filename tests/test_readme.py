"""The README's two set-up commands stay what CI and users run."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .venv .*$", readme, flags=re.M)
    assert len(commands) == 2
    assert commands[0].endswith("coreml-opt example --out out/example")
    assert commands[1].endswith("python -m pytest -q") and '".[test]"' in commands[1]
    assert "grep -m1 -E '^python3 -m venv .venv .*pytest' README.md" in (ROOT / ".ci" / "run").read_text()
