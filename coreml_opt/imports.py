"""User callables named ``package.module:fn`` or ``path/to/file.py:fn``: import and call them with errors that
point at the fix for how the user wrote them (a file in the cwd not on Python's path, a missing dependency, a
function that needs arguments, or one that raised)."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import CoreMLOptError

ErrorType = Callable[[str, str, str], CoreMLOptError]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else ""


def _import_file(path: str, label: str, error: ErrorType) -> object:
    """Import a ``.py`` file by path (its folder goes first on sys.path, so its sibling imports work)."""
    file = Path(path)
    if not file.is_file():
        raise error(label, f"file {path!r} does not exist", "check the path before the colon")
    folder = str(file.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules.setdefault(file.stem, module)  # pickling needs it; never shadow an imported module of that name
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except ImportError as exc:
        raise error(label, f"{path} imports {exc.name or 'a module'!r}, which is not installed ({_first_line(exc)})",
                    f"pip install the package that provides {exc.name or 'it'}") from None
    except Exception as exc:
        raise error(label, f"importing {path} raised {type(exc).__name__}: {_first_line(exc)}",
                    f"fix the error in {path} (python {path} shows the traceback)") from None
    return module


def _import_module(module_name: str, label: str, error: ErrorType) -> object:
    """Import ``module_name``; a module that is a file in the cwd but not importable gets the PYTHONPATH hint."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and missing != module_name and not module_name.startswith(missing + "."):
            raise error(label, f"module {module_name!r} imports {missing!r}, which is not installed",
                        f"pip install the package that provides {missing!r}") from None
        local = Path(*module_name.split(".")).with_suffix(".py")
        if local.is_file():
            raise error(label, f"cannot import {module_name!r}: {local} is in the current folder but not on "
                        "Python's path", f"pass {local}:{label.rpartition(':')[2] or 'fn'} (a file path), or run "
                        "with PYTHONPATH=. (the folder that holds it)") from None
        raise error(label, f"cannot import module {module_name!r} ({_first_line(exc)})",
                    "check the module name before the colon, that its package is installed, or pass a file "
                    "path, e.g. path/to/models.py:fn") from None
    except Exception as exc:
        raise error(label, f"importing module {module_name!r} raised {type(exc).__name__}: {_first_line(exc)}",
                    f"fix the error in {module_name} (python -c 'import {module_name}' shows the traceback)") from None


def import_callable(text: str, error: ErrorType, example: str = "coreml_opt.zoo:digits_cnn") -> Callable[..., Any]:
    """The callable named by ``package.module:fn`` or ``path/to/file.py:fn`` (``error`` builds the one-line error,
    whose input is ``text`` as the user gave it)."""
    source, sep, attr_path = str(text).rpartition(":")
    if not sep or not source or not attr_path or (os.sep in attr_path):
        raise error(text, "is not package.module:function or path/to/file.py:function",
                    f"write it as e.g. {example} or models.py:build")
    if source.endswith(".py"):
        obj: object = _import_file(source, text, error)
    else:
        obj = _import_module(source, text, error)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))][:8]
            raise error(text, f"{source!r} has no attribute {attr_path!r}",
                        "check the name after the colon" + (f"; it has {', '.join(names)}" if names else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(text, f"{attr_path!r} is {type(obj).__name__}, not a function or class",
                    "point at a function or class after the colon")
    return obj  # type: ignore[return-value]


def call_without_arguments(fn: Callable[..., Any], text: str, error: ErrorType) -> Any:
    """``fn()``; a signature that needs arguments and an exception raised inside are told apart."""
    try:
        inspect.signature(fn).bind()
    except TypeError as exc:
        raise error(text, f"needs arguments ({_first_line(exc)})",
                    "give its parameters defaults, or point at a wrapper function that takes none") from None
    except ValueError:
        pass  # no signature (builtins): just call it
    return call_user(fn, text, error)


def call_user(fn: Callable[..., Any], text: str, error: ErrorType, *args: Any) -> Any:
    """``fn(*args)`` for a user's function; an exception it raises becomes one line naming it and its message.

    A project error raised inside (a zoo factory's missing data set) already names its input and fix: both are
    kept, whole, after ``text``, instead of a truncated message and "fix the error in fn"."""
    try:
        return fn(*args)
    except CoreMLOptError as exc:
        raise error(text, f"{exc.input_name}: {exc.problem}", exc.fix) from None
    except Exception as exc:
        name = ".".join(x for x in (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)) if x) or str(fn)
        raise error(text, f"{name}() raised {type(exc).__name__}: {_first_line(exc)}",
                    f"fix the error in {name} (call it in Python to see the traceback)") from None
