"""Read a safetensors header without touching tensor data.

The header alone is enough to detect the architecture, read `__metadata__` and catch a
truncated or corrupt file before anything large is read.
"""

from __future__ import annotations

import json
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from darkroom.errors import ModelLoadError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER = 100 * 1024 * 1024
"""Longest header read (the safetensors library's own cap): reading and parsing stay bounded."""
MAX_DEPTH = 8
"""A header nests 3 levels (object -> tensor entry -> shape list); deeper is not a safetensors header."""


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_size: int = 0

    def shape(self, key: str) -> tuple[int, ...] | None:
        info = self.tensors.get(key)
        return info.shape if info else None

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.tensors)

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header; raise ModelLoadError naming the file and problem."""
    path = Path(path)
    name = path.name
    n, size, raw = _read_raw(path)
    doc = _parse(name, raw)
    metadata = doc.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, info in doc.items():
        try:
            dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if not 0 <= begin <= end or min(shape, default=0) < 0:
                raise ValueError("negative size")
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{name}: corrupt .safetensors header entry for {key!r}") from None
        if end > data_len:
            raise ModelLoadError(
                f"{name}: file is truncated (tensor {key!r} ends at byte {end + 8 + n}, file has"
                f" {size}); copy or download it again"
            )
        if dtype in DTYPE_SIZES:
            count = 1
            for s in shape:
                count *= s
            if end - begin != count * DTYPE_SIZES[dtype]:
                raise ModelLoadError(f"{name}: corrupt .safetensors header (size of {key!r} is wrong)")
        tensors[key] = TensorInfo(dtype, shape, (begin, end))
    if not isinstance(metadata, dict):
        metadata = {}
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, n)


def _read_raw(path: Path) -> tuple[int, int, bytes]:
    """(header length, file size, header bytes), refusing what cannot hold a header: a special
    file (a FIFO would block the read forever), a length over MAX_HEADER or past the end."""
    name = path.name
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"{name}: not a regular file (a folder, device, pipe or socket)")
        size = st.st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ModelLoadError(f"{name}: file is empty or too short to be a .safetensors file")
            (n,) = struct.unpack("<Q", raw_len)
            if n < 2 or n > MAX_HEADER or n + 8 > size:
                raise ModelLoadError(
                    f"{name}: not a valid .safetensors file (header length {n} does not fit"
                    f" in a {size}-byte file); it may be truncated, corrupt or another format"
                )
            return n, size, fh.read(n)
    except OSError as e:
        raise ModelLoadError(f"{name}: cannot read file: {e.strerror or e}") from None


def _parse(name: str, raw: bytes) -> dict:
    """The header as a JSON object no deeper than MAX_DEPTH levels.

    The JSON parser recurses once per level and gives up with RecursionError long before a
    hostile header's 200,000 levels; shallower excess is caught by `_deeper_than` after it.
    """
    too_deep = ModelLoadError(f"{name}: not a safetensors header (nested more than {MAX_DEPTH} levels deep);"
                              " the file is corrupt or another format")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, ValueError):
        doc = None
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{name}: corrupt .safetensors header (not valid JSON); copy the file again")
    if _deeper_than(doc, MAX_DEPTH):
        raise too_deep
    return doc


def _deeper_than(doc: dict, limit: int) -> bool:
    """Whether `doc` nests more than `limit` levels; level by level, so it never recurses."""
    level: list = [doc]
    for _ in range(limit):
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list))]
        if not level:
            return False
    return True
