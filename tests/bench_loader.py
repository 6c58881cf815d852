"""Import a bench/ script as a module: bench/ holds scripts, not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as module `name` (registered in sys.modules: dataclasses need it)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # some scripts import their siblings
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
