"""The public IQA data sets in one command: catalogue, download, safe unpacking, layout.

`qponder data list` shows `catalog.SETS`; `qponder data get NAME` runs `get.get_set`.
"""

from qponder_mlx.iqa_sets.catalog import SETS, IQASet, find_set
from qponder_mlx.iqa_sets.extract import Limits, UnsafeArchive, safe_extract
from qponder_mlx.iqa_sets.fetch import DataError
from qponder_mlx.iqa_sets.get import Prepared, get_set

__all__ = ["SETS", "DataError", "IQASet", "Limits", "Prepared", "UnsafeArchive", "find_set",
           "get_set", "safe_extract"]
