"""Shared session fixtures: the example digits model, its data and its Core ML conversion."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from coreml_opt import zoo


class ConvertedExample(NamedTuple):
    """The example model converted once per session: in-memory model, name mapping, saved path."""

    mlmodel: object  # coremltools.models.MLModel
    mapping: dict
    path: Path


@pytest.fixture(scope="session")
def digits_model() -> torch.nn.Module:
    """The pretrained digits CNN (from the user cache; trained on first use)."""
    return zoo.digits_cnn()


@pytest.fixture(scope="session")
def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) from ``zoo.digits_split()``."""
    return zoo.digits_split()


@pytest.fixture(scope="session")
def example_conversion(tmp_path_factory, digits_model) -> ConvertedExample:
    """The digits CNN converted for iOS18 and saved as an .mlpackage."""
    from coreml_opt.model.convert import convert

    path = tmp_path_factory.mktemp("example") / "digits_cnn.mlpackage"
    mlmodel, mapping = convert(digits_model, zoo.EXAMPLE_INPUT_SHAPE, target="iOS18",
                               output_path=path)
    return ConvertedExample(mlmodel, mapping, path)


@pytest.fixture(scope="session")
def example_mlpackage(example_conversion) -> Path:
    """Path of the saved example .mlpackage (treat as read-only; copy before changing)."""
    return example_conversion.path


@pytest.fixture(scope="session")
def example_iOS16_mlpackage(tmp_path_factory, digits_model) -> Path:
    """The digits CNN converted for iOS16 (iOS16 constexpr op formats)."""
    from coreml_opt.model.convert import convert

    path = tmp_path_factory.mktemp("example16") / "digits_cnn16.mlpackage"
    convert(digits_model, zoo.EXAMPLE_INPUT_SHAPE, target="iOS16", output_path=path)
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run the `coreml-opt` CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from coreml_opt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()
