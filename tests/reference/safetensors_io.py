"""A tiny safetensors writer and reader (F32 and I64 only), written from the format description:
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, optional
"__metadata__": {str: str}}, padded with spaces to a multiple of 8, then the raw little-endian
data; data_offsets are relative to the end of the header."""
from __future__ import annotations

import json
import struct
from typing import Dict, Mapping, Optional

import numpy as np

_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}
_NP = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8")}


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes tensors in the given order."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        a = np.asarray(arr)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if np.dtype(dt) not in _DTYPES:
            raise TypeError(f"{name}: unsupported dtype {a.dtype}")
        b = np.ascontiguousarray(a, dtype=dt).tobytes()
        header[name] = {"dtype": _DTYPES[np.dtype(dt)], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def read_safetensors(path: str):
    """Returns (dict name -> numpy array, metadata dict)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        dt = _NP[info["dtype"]]
        out[name] = np.frombuffer(data, dtype=dt, count=(e - b) // dt.itemsize,
                                  offset=base + b).reshape(info["shape"]).copy()
    return out, meta
