"""The fast k-means as a coremltools ``lut_function``: what is emitted is what was simulated."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import SpecError
from ..spec import CompensatedSpec, JointSpec, PalettizeSpec, Spec, parse_spec
from .kmeans import kmeans_scalar_fast, kmeans_vector_fast
from .palettize import _group_vectors


def fast_lut_function(spec: Spec | str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``OpPalettizerConfig(mode="custom", lut_function=...)`` callable: one group -> (lut, indices).

    Use as ``spec.coreml_config(lut_function=fast_lut_function(spec))``; the fast simulation is
    batch independent, so the palettes coremltools stores equal ``simulate(..., kmeans="fast")``.
    """
    spec = parse_spec(spec)
    if isinstance(spec, CompensatedSpec):  # +bc: the base's palettes (a +aw LUT has its own lut_function)
        spec = spec.base
    if isinstance(spec, JointSpec):
        spec = next((s for s in spec.steps if isinstance(s, PalettizeSpec)), None)
    if not isinstance(spec, PalettizeSpec) or spec.mode != "kmeans":
        raise SpecError(str(spec), "only k-means palettization has a fast lut_function",
                        "use a palN spec without /uniform; other modes need no custom function")
    k, cd = 1 << spec.nbits, spec.cluster_dim

    def lut_function(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if cd == 1:
            lut, idx = kmeans_scalar_fast(x.reshape(1, -1), k)
            return lut[0].numpy().astype(values.dtype), idx[0].numpy().astype(np.uint8)
        lut, idx = kmeans_vector_fast(_group_vectors(x, 1, cd), k)
        return lut[0].numpy().astype(values.dtype), idx[0].numpy().astype(np.uint8)

    return lut_function
