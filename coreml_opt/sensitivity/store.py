"""The results store: one SQLite file of finished trials, keyed by content.

A row is keyed by (model weights hash, data hash, metric, k-means mode, layer, spec), so an interrupted sweep
resumes where it stopped, a sweep with one more candidate runs only the new trials, and a changed
model or data set never reuses stale rows. Every trial is committed as soon as it finishes.
"""
from __future__ import annotations

import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Optional, Union

from ..errors import DataError

STORE_NAME = "sensitivity.sqlite"
# Compensations whose algorithm changed since a store may have been written: their rows are stored under
# ``spec@version``, so a changed simulation never reuses a stale value (plain specs are coremltools' own).
ALGORITHM_VERSIONS = {"+gptq": "gptq3"}


def stored_spec(spec: str) -> str:
    """The spec as the store keys it: with the version of each compensation algorithm it uses."""
    tags = [version for flag, version in ALGORITHM_VERSIONS.items() if flag in spec]
    return spec if not tags else f"{spec}@{'@'.join(tags)}"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    model_hash TEXT NOT NULL,
    data_hash  TEXT NOT NULL,
    metric     TEXT NOT NULL,
    kmeans     TEXT NOT NULL,
    layer      TEXT NOT NULL,
    spec       TEXT NOT NULL,
    value      REAL,
    seconds    REAL NOT NULL,
    created    REAL NOT NULL,
    PRIMARY KEY (model_hash, data_hash, metric, kmeans, layer, spec)
)
"""


class ResultStore:
    """Finished trials of one (model, data, metric, k-means mode) key in a SQLite file (or in memory)."""

    def __init__(self, path: Union[str, os.PathLike, None], model_hash: str, data_hash: str, metric: str,
                 kmeans: str = "exact") -> None:
        self.path = Path(path) if path is not None else None
        self.key = (model_hash, data_hash, metric, kmeans)  # fast k-means gives other palettes: other rows
        try:
            self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")  # a killed process loses no committed trial
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise DataError(str(self.path), f"is not a usable results store ({exc})",
                            "delete it to start the sweep afresh, or choose another --out") from None

    def finished(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(layer, spec) -> (metric value, seconds) of every stored trial for this key."""
        rows = self._db.execute("SELECT layer, spec, value, seconds FROM trials "
                                "WHERE model_hash=? AND data_hash=? AND metric=? AND kmeans=?", self.key)
        current = {}
        for layer, spec, value, seconds in rows:
            plain = spec.split("@")[0]
            if stored_spec(plain) == spec:  # rows of an older algorithm version are never read
                current[(layer, plain)] = (math.nan if value is None else value, seconds)
        return current

    def add(self, layer: str, spec: str, value: float, seconds: float) -> None:
        """Store one finished trial and commit at once (a killed sweep keeps it)."""
        stored: Optional[float] = None if math.isnan(value) else value
        self._db.execute("INSERT OR REPLACE INTO trials VALUES (?,?,?,?,?,?,?,?,?)",
                         (*self.key, layer, stored_spec(spec), stored, seconds, time.time()))
        self._db.commit()

    def close(self) -> None:
        self._db.close()
