"""`ray` as tests/test_readme.py runs the README's blocks: `ray start ...` starts the real node (`ray start --block`
in a session of its own, a temp folder of its own, small object store) and returns once it has joined; `ray stop`
kills exactly the nodes this shim started (the real `ray stop` stops every Ray process on the machine). Other
subcommands run the real `ray`. State (the sessions started) is kept in $RAY_SHIM_DIR."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray_cluster import RAY, kill_session, start_node, wait_for_cpus  # noqa: E402

STATE = Path(os.environ.get("RAY_SHIM_DIR", ".")) / "ray-shim.json"


def _load() -> dict:
    return json.loads(STATE.read_text()) if STATE.exists() else {"sessions": [], "cpus": 0, "temp": None}


def _option(options: list[str], name: str, default: str) -> str:
    return options[options.index(name) + 1] if name in options else default


def start(options: list[str]) -> None:
    state = _load()
    extra = ["--include-dashboard", "false"] if "--head" in options else []
    if state["temp"] is None:  # short: Ray's socket paths have a length limit
        state["temp"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    if "--head" in options:
        extra += ["--temp-dir", state["temp"]]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    node = start_node([*options, *extra], Path(state["temp"]), env,
                      Path(state["temp"]) / f"node-{len(state['sessions'])}.log")
    state["sessions"].append(node.pid)
    STATE.write_text(json.dumps(state))
    if "--head" in options:
        port = int(_option(options, "--port", "6379"))
        end = time.time() + 120
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        print(f"Ray head started on 127.0.0.1:{port}")
    else:
        state["cpus"] += int(_option(options, "--num-cpus", str(os.cpu_count())))
        STATE.write_text(json.dumps(state))
        wait_for_cpus(_option(options, "--address", ""), state["cpus"], env, 120)
        print(f"Ray worker node joined ({state['cpus']} CPUs in the cluster)")


def stop() -> None:
    state = _load()
    for sid in state["sessions"]:
        kill_session(sid)
    if state["temp"]:
        shutil.rmtree(state["temp"], ignore_errors=True)
    STATE.unlink(missing_ok=True)
    print(f"stopped {len(state['sessions'])} Ray node(s)")


def main(argv: list[str]) -> int:
    if argv[:1] == ["start"]:
        start(argv[1:])
    elif argv[:1] == ["stop"]:
        stop()
    else:
        os.execv(str(RAY), [str(RAY), *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
