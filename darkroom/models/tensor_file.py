"""Read a .safetensors file's tensors with plain reads, never a memory map.

safetensors' own readers (`safe_open`, `load_file`) map the file into memory: if the drive
holding it goes away while a tensor is copied out (a USB drive pulled), the touched page kills
the process with SIGBUS. A plain read fails with an OSError instead, which becomes the one-line
error of fsutil.read_error naming the file (DR-STORAGE-GONE: reconnect the drive). Each tensor's
bytes are read straight into the tensor that is returned, so the peak is what the caller keeps,
with no mapped copy counted beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch

from darkroom.errors import ModelLoadError
from darkroom.fsutil import read_error
from darkroom.models.header import SafetensorsHeader, read_header

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
"""safetensors dtype names -> torch dtypes (the float8 ones only where this torch has them)."""


class TensorReadError(ModelLoadError):
    """A .safetensors file whose tensors cannot be read. `reason` is the why without the file's
    name, for callers that name the file their own way (a LoRA by its prompt name)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path.name}: cannot read tensors ({reason})")


def _open(path: Path) -> BinaryIO:
    """The file, opened for plain reads (tests put a failing file in its place)."""
    return open(path, "rb")


def read_tensors(path: str | Path, keys: Iterable[str] | None = None, *,
                 header: SafetensorsHeader | None = None) -> dict[str, torch.Tensor]:
    """Tensors `keys` (default: all) of a .safetensors file, in the order asked, read in file order.

    `header`: the file's header when the caller has read it already. Errors: the header's own
    ModelLoadError for a corrupt or truncated header, TensorReadError for a tensor that cannot be
    read (a dtype this reader does not know, a file cut short since), fsutil.read_error's
    StorageError for a read that fails (the drive removed)."""
    path = Path(path)
    header = header if header is not None else read_header(path)
    wanted = list(header.tensors) if keys is None else list(dict.fromkeys(keys))
    for key in wanted:
        if key not in header.tensors:
            raise TensorReadError(path, f"it has no tensor {key!r}")
        if DTYPES.get(header.tensors[key].dtype) is None:
            raise TensorReadError(path, f"tensor {key!r} has dtype {header.tensors[key].dtype}, which Darkroom"
                                        " cannot read")
    start = 8 + header.header_size
    out: dict[str, torch.Tensor] = {}
    try:
        with _open(path) as fh:
            for key in sorted(wanted, key=lambda k: header.tensors[k].offsets[0]):
                info = header.tensors[key]
                begin, end = info.offsets
                buf = torch.empty(end - begin, dtype=torch.uint8)
                fh.seek(start + begin)
                if _fill(fh, buf) != end - begin:
                    raise TensorReadError(path, f"the file ends inside tensor {key!r}; it was truncated or changed"
                                                " while loading")
                out[key] = buf.view(DTYPES[info.dtype]).reshape(info.shape)
    except OSError as e:
        raise read_error(e, path) from None
    return {k: out[k] for k in wanted}


def _fill(fh: BinaryIO, buf: torch.Tensor) -> int:
    """Read into `buf` (uint8) until it is full or the file ends; the number of bytes read."""
    view = memoryview(buf.numpy())
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def check_layout(header: SafetensorsHeader) -> None:
    """Refuse a file whose tensors do not tile its data exactly (gaps, overlaps, bytes left over) or
    that holds a dtype this reader does not know: the checks safetensors makes when it opens a file,
    made here without mapping it."""
    path = header.path
    try:
        data_len = path.stat().st_size - 8 - header.header_size
    except OSError as e:
        raise read_error(e, path) from None
    at = 0
    for key, info in sorted(header.tensors.items(), key=lambda kv: kv[1].offsets):
        if DTYPES.get(info.dtype) is None:
            raise TensorReadError(path, f"tensor {key!r} has dtype {info.dtype}, which Darkroom cannot read")
        begin, end = info.offsets
        if begin != at:
            raise TensorReadError(path, f"tensor {key!r} starts at byte {begin} of the data, not at {at} where the"
                                        " one before it ends; the file is corrupt")
        at = end
    if at != data_len:
        raise TensorReadError(path, f"its tensors cover {at} bytes of its {data_len} bytes of data; the file is"
                                    " corrupt")
