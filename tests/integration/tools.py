"""Looking up the tools the deploy tests need: a missing one skips the test, or fails it
under CI (`CI=true`), where every tool must be installed."""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest


def in_ci() -> bool:
    """True when running under CI (`CI=true`)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(what: str, how: str) -> None:
    """Fail under CI, else skip, saying what is missing and how to install it."""
    message = f"{what} is not installed ({how})"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_module(name: str, package: str) -> ModuleType:
    """Import module `name` of PyPI package `package`, or skip/fail."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python package {package}", f"pip install {package}")
        raise


def require_command(name: str, how: str) -> str:
    """The path of executable `name`, or skip/fail."""
    path = shutil.which(name)
    if path is None:
        missing(f"command {name}", how)
        raise AssertionError("unreachable")
    return path
