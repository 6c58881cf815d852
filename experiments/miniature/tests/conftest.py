"""The miniature's modules are scripts beside this folder, imported by name (as they import each
other when run as `python experiments/miniature/reproduce.py`)."""

import sys
from pathlib import Path

MINIATURE = Path(__file__).resolve().parents[1]
if str(MINIATURE) not in sys.path:
    sys.path.insert(0, str(MINIATURE))
