"""The Ray executor (``--executor ray``): a sweep's trials run by actors on a Ray cluster; the driver stores their rows.

Each actor is a :class:`~coreml_opt.sensitivity.worker.SweepWorker`: it loads the model and data once from what the
user named (a factory ``module:fn`` or ``path/to/file.py:fn``, an ``.mlpackage`` path, a data path; never pickled
tensors), in the driver's working folder and with the driver's torch thread count, and runs batches of one layer's
trials exactly as a local sweep does. The driver writes each batch's rows to the sweep's content-addressed store as
the batch returns, so a distributed sweep resumes locally and a local one on the cluster. An actor whose node is
lost restarts on another node (``max_restarts``) and Ray reruns the batches it held (``max_task_retries``); rows are
stored only when a batch returns and the store keys a trial by (layer, spec), so no trial is lost or stored twice.
Ray is imported only here, only when asked for (``pip install -e ".[ray]"``).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from typing import Any, Optional, Sequence

import torch

from ..errors import CoreMLOptError, DataError, ModelError
from ..spec import Spec
from .layers import Layer
from .store import ResultStore
from .sweep import TrialBook, record_outcome
from .worker import SweepWorker, raise_error_row

logger = logging.getLogger(__name__)

BATCH_TRIALS = 8  # trials per actor call: one layer's candidates, so pal4 and pal2 reuse pal6's k-means table
IN_FLIGHT = 2  # calls queued per actor: the next batch is waiting when one returns
WAIT_LOG_SECONDS = 60.0  # log a waiting line this often while no batch returns (a lost node, no free CPU)
INSTALL = 'pip install -e ".[ray]" (or pip install "ray==2.60.0") on the driver and every node'


def import_ray() -> Any:
    """The ``ray`` module; one line naming the install when it is absent."""
    try:
        import ray
    except ImportError:
        raise CoreMLOptError("--executor ray", "needs Ray, which is not installed", INSTALL) from None
    return ray


def check_recipe(model: Any, data: Any, metric: Any, reference: Any = None) -> None:
    """One line when a sweep for Ray names something a worker cannot load by name (a Python object), or Ray is
    absent; checked before any work."""
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"model {type(model).__name__}", "is a Python object, and Ray workers load the model by name",
                         "pass a factory (package.module:fn or path/to/file.py:fn) or an .mlpackage path")
    for what, value in (("data", data), ("reference", reference)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise DataError(f"{what} {type(value).__name__}", "is a Python object, and Ray workers load it by name",
                            f"pass the {what} as a path or a package.module:fn factory")
    if not isinstance(metric, str):
        raise DataError(f"metric {getattr(metric, '__qualname__', type(metric).__name__)}",
                        "is a Python function, and Ray workers load the metric by name",
                        "pass a metric name or package.module:fn")
    import_ray()


def connect(ray: Any, address: Optional[str]) -> bool:
    """Connect to the cluster at ``address`` (HOST:PORT; None: ``RAY_ADDRESS`` or a new one-machine Ray); True when
    this call connected (so the caller disconnects). One line for an address nobody answers at."""
    if ray.is_initialized():
        return False
    if address and ":" in address and "://" not in address:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as exc:
            raise CoreMLOptError(f"--address {address}", f"is not reachable ({exc})",
                                 "start the head there (ray start --head --port PORT) or pass the address "
                                 "`ray start --head` printed") from None
    options: dict[str, Any] = {} if address else {"include_dashboard": False}
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **options)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CoreMLOptError(f"--address {address or 'auto'}", f"is not a Ray cluster this driver can join ({line})",
                             "pass the HOST:PORT that `ray start --head` printed, with the same Ray version") from None
    return True


def batches(runnable: Sequence[tuple[Layer, Spec]]) -> list[list[tuple[str, str]]]:
    """The trials as (layer, spec) name batches of one layer each, at most BATCH_TRIALS long, in sweep order."""
    out: list[list[tuple[str, str]]] = []
    for layer, spec in runnable:
        if out and out[-1][0][0] == layer.layer and len(out[-1]) < BATCH_TRIALS:
            out[-1].append((layer.layer, str(spec)))
        else:
            out.append([(layer.layer, str(spec))])
    return out


def run_on_ray(address: Optional[str], kind: str, recipe: dict[str, Any], runnable: list[tuple[Layer, Spec]],
               store: ResultStore, book: TrialBook, bar: Any, deadline: Optional[float], label: str) -> None:
    """Run ``runnable`` on the cluster at ``address`` by actors that prepare the model from ``recipe`` (``kind``
    "factory" or "package", see worker.py), storing each batch's rows as it returns; stops submitting at
    ``deadline`` (perf_counter seconds). A worker's one-line error is raised here."""
    if not runnable:
        return
    ray = import_ray()
    owned = connect(ray, address)
    actors: list[Any] = []
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < 1:
            raise CoreMLOptError(f"--address {address or 'auto'}", "has no CPUs for workers (a head started with "
                                 "--num-cpus 0 and no worker nodes)",
                                 "start a worker node: ray start --address HOST:PORT --num-cpus N")
        todo = deque(batches(runnable))
        worker = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(SweepWorker)
        actors = [worker.remote(kind, recipe, store.key, os.getcwd(), torch.get_num_threads())
                  for _ in range(min(cpus, len(todo)))]
        logger.info("Ray: %d trials in %d batches on %d workers", len(runnable), len(todo), len(actors))
        running: dict[Any, Any] = {}
        starting = {actor.ready.remote(): actor for actor in actors}  # batches go only to actors that answered

        def submit(actor: Any) -> None:
            if todo and (deadline is None or time.perf_counter() < deadline):
                running[actor.run.remote(todo.popleft())] = actor

        while running or (todo and starting and (deadline is None or time.perf_counter() < deadline)):
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=WAIT_LOG_SECONDS)
            if not done:
                logger.warning("Ray: no batch returned in %.0f s (%d running, %d workers starting); waiting for "
                               "workers", WAIT_LOG_SECONDS, len(running), len(starting))
                continue
            if done[0] in starting:
                actor = starting.pop(done[0])
                try:
                    ray.get(done[0])
                except ray.exceptions.RayError as exc:  # never came up: its share goes to the others
                    logger.warning("Ray: a worker did not start (%s)", type(exc).__name__)
                    continue
                for _ in range(IN_FLIGHT):
                    submit(actor)
                continue
            actor = running.pop(done[0])
            try:
                outcomes, error = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                raise CoreMLOptError(label, f"failed on a Ray worker ({type(exc).__name__}: {line})",
                                     "install coreml-opt and the model's code on every node (the Ray logs show "
                                     "the worker's traceback)") from None
            for outcome in outcomes:
                record_outcome(outcome, store, book, bar)
            if error is not None:
                raise_error_row(error)
            submit(actor)
        if todo:
            logger.info("time budget reached after %d trials", book.ran)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if owned:
            ray.shutdown()
