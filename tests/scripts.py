"""The repository's scripts (examples/, benchmarks/) loaded as modules: they are not part of the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, folder: str = "examples") -> ModuleType:
    """`REPO_ROOT/folder/name.py` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
