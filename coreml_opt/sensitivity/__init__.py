"""Sensitivity analysis: compress one layer at a time, measure the metric drop, rank the layers.

``analyse(model, input_shape, data, metric)`` runs (resumably) every (layer, candidate) trial with
the simulation engine (``analyse_package`` for a model given only as an .mlpackage, run by the package
runtime; ``groups=`` sweeps layer groups, see groups.py); both take ``executor="ray", address="HOST:PORT"``
to run the trials on a Ray cluster (ray_executor.py, worker.py), with the same store and values;
``load_sweep(dir)`` reads a finished sweep back for the planner;
``make_evaluator`` gives the same evaluation as a ``callable(model) -> float``.
Command line: ``python -m coreml_opt.sensitivity --help``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from ..errors import DataError
from ..evaluation import Evaluator, make_evaluator
from .groups import Group, resolve_groups
from .layers import Layer, find_layers
from .store import STORE_NAME, ResultStore
from .package_sweep import analyse_package
from .sweep import DEFAULT_LADDER, SweepResult, Trial, analyse

__all__ = ["analyse", "analyse_package", "make_evaluator", "load_sweep", "Evaluator", "SweepResult", "Trial", "Layer", "find_layers",
           "ResultStore", "STORE_NAME", "DEFAULT_LADDER", "Group", "resolve_groups"]


def load_sweep(directory: Union[str, Path]) -> tuple[dict[str, Any], list[Trial]]:
    """(sweep.json dict, trials) of a sweep output directory; one-line DataError when missing."""
    directory = Path(directory)
    docs = []
    for name in ("sweep.json", "trials.json"):
        path = directory / name
        if not path.is_file():
            raise DataError(str(directory), f"has no {name}",
                            "run `python -m coreml_opt.sensitivity ... --out DIR` first")
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(str(path), f"is not valid JSON ({exc})", "rerun the sweep to rewrite it") from None
    sweep, rows = docs
    fields = set(Trial.__dataclass_fields__)
    try:
        trials = [Trial(**{k: (float("nan") if v is None and k in ("metric", "drop") else v)
                           for k, v in row.items() if k in fields}) for row in rows]
    except TypeError as exc:
        raise DataError(str(directory / "trials.json"), f"has malformed rows ({exc})",
                        "rerun the sweep to rewrite it") from None
    return sweep, trials
