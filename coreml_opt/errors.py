"""User-facing errors: one line naming the input, the problem and the fix."""
from __future__ import annotations


class CoreMLOptError(Exception):
    """An error caused by user input; the CLI prints it as one line and exits non-zero."""

    def __init__(self, input_name: str, problem: str, fix: str) -> None:
        self.input_name = input_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{input_name}: {problem}; {fix}")


class SpecError(CoreMLOptError, ValueError):
    """An invalid compression spec string or spec parameters."""


class PlanError(CoreMLOptError, ValueError):
    """An invalid plan: unknown layer, target too old, shape that does not divide."""


class ModelError(CoreMLOptError):
    """A model input that is missing, corrupt or of an unsupported kind."""


class RuntimeOpError(ModelError):
    """An op of a package that failed in the package runtime (a handler fault), named with its package."""


class DataError(CoreMLOptError):
    """Evaluation or calibration data that is missing, empty or unreadable."""


class OutputError(CoreMLOptError):
    """An output path that cannot be written: wrong suffix, inside an input, unwritable folder or full disk."""
