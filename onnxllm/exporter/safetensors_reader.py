"""A checkpoint's safetensors read tensor by tensor: a name -> float32 array mapping that reads on access.

Each access reads one tensor with a plain file read and converts it (bfloat16/float16/float32) to a fresh
float32 array that the caller frees when done. Not memory-mapped (safetensors' own `safe_open` maps the
files): mapped pages that have been read stay in the process's resident set, so a streamed 0.5B export
peaked at 1.29x the weights' size with `safe_open`; plain reads leave them to the page cache.
The format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets
relative to the end of the header), then the data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsStateDict(Mapping):
    def __init__(self, folder: Path):
        self._where: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, header entry)
        for path in sorted(Path(folder).glob("*.safetensors")):
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    self._where[name] = (path, 8 + size, entry)

    def __getitem__(self, key: str) -> np.ndarray:
        path, start, entry = self._where[key]
        kind = entry["dtype"]
        if kind not in _DTYPES:
            raise ValueError(f"tensor {key} has dtype {kind}; the exporter reads F32, F16, BF16 and F64")
        begin, end = entry["data_offsets"]
        with open(path, "rb") as f:
            f.seek(start + begin)
            raw = np.fromfile(f, dtype=_DTYPES[kind], count=(end - begin) // np.dtype(_DTYPES[kind]).itemsize)
        if kind == "BF16":  # bfloat16 is the top half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape(entry["shape"])

    def __contains__(self, key) -> bool:
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def fp32_bytes(self) -> int:
        """What the weights take in float32: the yardstick for an export's memory."""
        return sum(4 * int(np.prod(entry["shape"])) for _, _, entry in self._where.values())
