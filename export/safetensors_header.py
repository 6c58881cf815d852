"""Read and check a safetensors file's header without loading any tensor.

Format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian u64 N, then
N bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}, then the data. A loader trusts N and the offsets; a crafted or truncated file (N =
2^62, offsets past the end) makes it allocate or read garbage, so `qponder bundle verify` checks
every header here first, and the MLX Swift check reads names and shapes from the same header.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# Headers of real checkpoints are well under 1 MiB (the 3B: ~100 kB for ~800 tensors); 100 MiB
# is the bound the safetensors reference implementation uses (MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000

# Bytes per element of the dtypes safetensors defines; the 4-bit/8-bit float types MLX writes for
# mxfp4 scales are stored as U8.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
               "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


class HeaderError(ValueError):
    """A safetensors header that a loader must not trust; one line naming the file."""


def read_header(path: str | Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a checked header (no metadata).

    Raises HeaderError when the file is shorter than its header claims, the header is not a JSON
    object, or any tensor's offsets fall outside the data section or disagree with its shape.
    """
    path = Path(path)
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"{path}: {size} bytes, shorter than a safetensors header — the "
                              "file is truncated; re-export the bundle")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise HeaderError(f"{path}: header length {n} exceeds the file ({size} bytes) or "
                              f"the {MAX_HEADER_BYTES}-byte limit — corrupt or crafted; "
                              "re-export the bundle")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{path}: header is not valid UTF-8 JSON ({type(e).__name__}) — "
                          "re-export the bundle") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: header is not a JSON object — re-export the bundle")
    data_bytes = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _checked_entry(path, name, entry, data_bytes)
    return tensors


def _checked_entry(path: Path, name: str, entry, data_bytes: int) -> dict:
    bad = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{bad} has no dtype/shape/data_offsets entry — re-export the bundle")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise HeaderError(f"{bad}: unknown dtype {dtype!r} — re-export the bundle")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                            and d >= 0 for d in shape)):
        raise HeaderError(f"{bad}: shape {shape!r} is not a list of sizes — re-export the bundle")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise HeaderError(f"{bad}: data_offsets {offsets!r} malformed — re-export the bundle")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise HeaderError(f"{bad}: data_offsets {offsets} outside the {data_bytes}-byte data "
                          "section — the file is truncated or corrupt; re-export the bundle")
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise HeaderError(f"{bad}: {end - begin} bytes for shape {shape} of {dtype} — corrupt; "
                          "re-export the bundle")
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}
