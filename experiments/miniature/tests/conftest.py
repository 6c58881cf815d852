"""The miniature's modules are scripts beside this folder, imported by name (as they import each
other when run as `python experiments/miniature/reproduce.py`).

The product's shared fixtures (one tiny Qwen2.5-VL per session, the packaged CC0 labels, the
offline environment) come from its tests/conftest.py, loaded by path: that folder is no package,
and `pytest_plugins` is refused outside the root conftest."""

import importlib.util
import sys
from pathlib import Path

MINIATURE = Path(__file__).resolve().parents[1]
if str(MINIATURE) not in sys.path:
    sys.path.insert(0, str(MINIATURE))

_spec = importlib.util.spec_from_file_location(
    "qponder_product_test_fixtures", MINIATURE.parents[1] / "tests" / "conftest.py")
_product = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_product)

cc0_labels = _product.cc0_labels
tiny_loaded = _product.tiny_loaded
tiny_model_dir = _product.tiny_model_dir
