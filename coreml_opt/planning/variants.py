"""The metric of a plan with one layer changed, for many (layer, spec) changes, each run from that layer's cut.

Every change keeps all other layers compressed per the plan, so the activations before the changed layer's
first reader are the plan's own: they are recorded once per plan (``sensitivity.suffix.SuffixRunner``, which
checks that the traced graph reproduces the plan's outputs bit for bit) and each change runs only the graph
after its cut. Layers whose cut is unavailable run the full forward pass; the metric is the same either way.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from ..evaluation import run_batches
from ..simulate import apply_plan

if TYPE_CHECKING:
    from ..sensitivity.suffix import SuffixRunner

logger = logging.getLogger(__name__)


class PlanVariants:
    """``variants(plan, [(layer, spec), ...]) -> [metric, ...]`` for a torch model and a built-in-metric evaluator."""

    def __init__(self, model: nn.Module, evaluator: Any, layer_paths: Mapping[str, Sequence[str]],
                 fixed: Sequence[str] = (), kmeans: str = "exact") -> None:
        """``layer_paths``: each swept layer -> every parameter path holding its weight (tied aliases), in forward
        order; ``fixed`` are the unswept weights, stored fp16 ("none") as in ``PlanningSession.measure``."""
        self.model, self.evaluator, self.kmeans = model, evaluator, kmeans
        # Late layers first: their activations are small and their suffixes short, so they get the cache budget.
        self.layer_paths = dict(reversed(list(layer_paths.items())))
        self.fixed = list(fixed)
        self.evaluations = 0
        # The uncompressed weights: a change is simulated from these, as the sweep and the emitted package do.
        self._originals = {layer: model.get_parameter(layer).detach().clone() for layer in layer_paths}

    @staticmethod
    def supports(evaluator: Any) -> bool:
        """Whether ``evaluator`` scores per-batch outputs (a built-in metric); user metrics take whole models."""
        return getattr(evaluator, "user_fn", True) is None and hasattr(evaluator, "score")

    def __call__(self, plan: Mapping[str, str], changes: Sequence[tuple[str, str]]) -> list[float]:
        """The metric of ``plan`` with ``layer`` set to ``spec``, for each change (every other layer per ``plan``)."""
        if not changes:
            return []
        from ..sensitivity.suffix import SuffixRunner

        model, evaluator = self.model, self.evaluator
        assignment = {path: "none" for path in self.fixed}
        assignment.update(plan)
        was_training = model.training
        model.eval()
        try:
            with apply_plan(model, assignment, kmeans=self.kmeans):
                runner = SuffixRunner(model, {layer: self.layer_paths.get(layer, (layer,)) for layer in
                                              self.layer_paths if any(layer == c for c, _ in changes)})
                runner.prepare(evaluator.batches, run_batches(model, evaluator.batches))
                logger.info("plan variants: %d of %d changed layers run from their cut", len(runner.available),
                            len({layer for layer, _ in changes}))
                return [self._one(runner, layer, spec) for layer, spec in changes]
        finally:
            model.train(was_training)

    def _one(self, runner: SuffixRunner, layer: str, spec: str) -> float:
        """One change: ``layer`` simulated at ``spec`` from its original weight, then back to the plan's weight."""
        param = self.model.get_parameter(layer)
        planned = param.detach().clone()
        with torch.no_grad():
            param.copy_(self._originals[layer])
        try:
            with apply_plan(self.model, {layer: spec}, kmeans=self.kmeans):
                outputs = runner.outputs(layer)
                self.evaluations += 1
                return self.evaluator.score(outputs if outputs is not None
                                            else run_batches(self.model, self.evaluator.batches))
        finally:
            with torch.no_grad():
                param.copy_(planned)
