"""Model inputs for conversion: name, shape and dtype, written ``ids:1,16:int32`` on the command line.

Integer inputs (token ids, attention masks) are declared ``int32`` in Core ML; their example
values for tracing are drawn below the smallest ``nn.Embedding`` vocabulary so any lookup is valid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import coremltools as ct
import numpy as np
import torch
from torch import nn

from coreml_opt.errors import ModelError

# dtype word -> (Core ML input dtype, torch dtype of the traced example)
DTYPES: dict[str, tuple[type, torch.dtype]] = {
    "fp32": (np.float32, torch.float32),
    "fp16": (np.float16, torch.float32),  # Core ML casts fp16 inputs; the torch model still sees fp32
    "int32": (np.int32, torch.int64),  # torch indexing wants int64; coremltools stores ints as int32
}
_FORM = "write NAME:SHAPE[:DTYPE], e.g. ids:1,16:int32 or x:1,3,224,224 (dtypes: " + ", ".join(DTYPES) + ")"


@dataclass(frozen=True)
class InputSpec:
    """One model input: Core ML name, fixed shape, and dtype word (None: coremltools' default float)."""

    name: str
    shape: tuple[int, ...]
    dtype: Optional[str] = None

    def __post_init__(self) -> None:
        label = f"input {self.name!r}"
        if not self.name or not self.name.isidentifier():
            raise ModelError(label, "is not a valid input name", "use letters, digits and _ (e.g. input_ids)")
        if not self.shape or any(int(d) <= 0 for d in self.shape):
            raise ModelError(label, f"has shape {list(self.shape)}", "give positive dimensions, e.g. 1,16")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ModelError(label, f"has unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")

    @property
    def is_integer(self) -> bool:
        return self.dtype == "int32"

    def tensor_type(self) -> ct.TensorType:
        """The coremltools input declaration."""
        dtype = DTYPES[self.dtype][0] if self.dtype else None
        return ct.TensorType(name=self.name, shape=self.shape, dtype=dtype)

    def example(self, model: nn.Module, generator: torch.Generator) -> torch.Tensor:
        """A traced example: uniform [0, 1) floats, or ints below the smallest embedding vocabulary (else 0/1)."""
        return self._draw(model, self.shape, generator)

    def samples(self, model: nn.Module, n: int, generator: torch.Generator, vocab: Optional[int] = None
                ) -> torch.Tensor:
        """``n`` seeded data-free samples, shape (n, *shape[1:]), drawn like ``example``; ``vocab`` (token ids
        below it) replaces the model's embeddings where there is no module, e.g. for a package."""
        return self._draw(model, (n, *self.shape[1:]), generator, vocab)

    def _draw(self, model: nn.Module, shape: tuple[int, ...], generator: torch.Generator,
              vocab: Optional[int] = None) -> torch.Tensor:
        if not self.is_integer:
            return torch.rand(shape, generator=generator)
        if vocab is None:
            vocab = min((m.num_embeddings for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))),
                        default=2)
        return torch.randint(0, vocab, shape, generator=generator, dtype=DTYPES["int32"][1])

    def __str__(self) -> str:
        return f"{self.name}:{','.join(map(str, self.shape))}" + (f":{self.dtype}" if self.dtype else "")


def parse_input(text: Union[str, InputSpec]) -> InputSpec:
    """``ids:1,16:int32`` -> InputSpec("ids", (1, 16), "int32"); raises ModelError naming ``text``."""
    if isinstance(text, InputSpec):
        return text
    parts = str(text).split(":")
    if len(parts) not in (2, 3):
        raise ModelError(f"--input {text}", "is not NAME:SHAPE[:DTYPE]", _FORM)
    try:
        shape = tuple(int(v) for v in parts[1].replace("x", ",").split(","))
    except ValueError:
        raise ModelError(f"--input {text}", f"shape {parts[1]!r} is not comma-separated integers", _FORM) from None
    try:
        return InputSpec(parts[0], shape, parts[2].lower() if len(parts) == 3 else None)
    except ModelError as exc:
        raise ModelError(f"--input {text}", exc.problem, exc.fix) from None


def resolve_inputs(input_shape: Optional[Sequence[int]], inputs: Optional[Sequence[Union[str, InputSpec]]],
                   input_name: str) -> list[InputSpec]:
    """The model's inputs from either one ``input_shape`` (named ``input_name``) or ``inputs``, in forward() order."""
    if (input_shape is None) == (not inputs):
        raise ModelError("inputs", "give either input_shape or inputs (not both, not neither)",
                         "pass --input-shape 1,1,8,8 for one float input or --input NAME:SHAPE[:DTYPE] per input")
    specs = [InputSpec(input_name, tuple(int(d) for d in input_shape))] if input_shape is not None \
        else [parse_input(t) for t in inputs]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ModelError(f"input {dupes[0]!r}", "is given twice", "give each input a distinct name")
    return specs


def single_input(value: Union[Sequence[int], Sequence[Union[str, InputSpec]], InputSpec]) -> InputSpec:
    """The one input a sweep feeds the model: a shape (one float input ``x``) or one ``NAME:SHAPE[:DTYPE]``
    (e.g. ``ids:1,16:int32`` for token ids); ModelError for a bad shape or several inputs."""
    if isinstance(value, (str, InputSpec)):
        value = [value]
    if value and all(isinstance(d, (int, np.integer)) for d in value):
        shape = tuple(int(d) for d in value)
        if any(d <= 0 for d in shape):
            raise ModelError(f"input shape {list(shape)}", "must be positive integers", "use e.g. 1,1,8,8")
        return InputSpec("x", shape)
    specs = [parse_input(v) for v in value]
    if len(specs) != 1:
        raise ModelError("inputs " + ", ".join(map(str, specs)), f"are {len(specs)} inputs; a sweep feeds one",
                         "sweep a model whose forward() takes one input (wrap the others as constants)")
    return specs[0]
