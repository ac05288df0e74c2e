"""An engine's per-image state (`Embedding`) and its byte form.

Byte layout (no pickle: nothing in it can run code when read):

    b"SAMEMB1\\n" | header length (uint32, little-endian) | header (JSON, UTF-8) | array bytes

The header names the engine id, the image size `[width, height]`, small `meta` values, the crc32
of the array bytes, and for each array its name, dtype (numpy's `str`, e.g. `<f4`), shape and
offset. Arrays are C-ordered. Reading checks the magic, the header, every dtype against an
allow-list, every extent against the payload and the crc32: a torn or foreign blob raises
`EmbeddingFormatError` and is never half-read.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam_backend.segment.geometry import ImageSize

MAGIC = b"SAMEMB1\n"
_ALLOWED_DTYPES = {"<f2", "<f4", "<f8", "|u1", "<i4", "<i8", "|b1"}
_MAX_HEADER = 1 << 20


class EmbeddingFormatError(ValueError):
    """Bytes that are not an embedding written by `pack` (torn, foreign or from another version)."""


@dataclass(frozen=True)
class Embedding:
    """What `Engine.embed` returns and `Engine.predict` needs.

    `features`: named arrays (numpy, or torch tensors on the engine's device); `meta`: small JSON
    values (e.g. SAM's resized input size); `nbytes`: what the arrays cost a cache.
    """

    engine_id: str
    image_size: ImageSize
    features: Mapping[str, Any]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", ImageSize(*self.image_size))

    @property
    def nbytes(self) -> int:
        """Bytes held by the feature arrays."""
        return int(sum(int(a.nbytes) for a in self.features.values()))


def pack(embedding: Embedding, arrays: Mapping[str, np.ndarray]) -> bytes:
    """`embedding`'s identity and meta with `arrays` (its features as CPU numpy arrays) → bytes."""
    entries, chunks, offset = [], [], 0
    for name, array in arrays.items():
        a = np.ascontiguousarray(array)
        dtype = a.dtype.newbyteorder("<").str if a.dtype.byteorder == ">" else a.dtype.str
        if dtype not in _ALLOWED_DTYPES:
            raise EmbeddingFormatError(f"{name}: dtype {a.dtype} cannot be stored; expected one of "
                                       f"{sorted(_ALLOWED_DTYPES)}")
        raw = a.astype(dtype, copy=False).tobytes()
        entries.append({"name": name, "dtype": dtype, "shape": list(a.shape), "offset": offset})
        chunks.append(raw)
        offset += len(raw)
    payload = b"".join(chunks)
    header = json.dumps({"engine_id": embedding.engine_id, "image_size": list(embedding.image_size),
                         "meta": dict(embedding.meta), "crc32": zlib.crc32(payload), "size": len(payload),
                         "arrays": entries}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + payload


def unpack(data: bytes) -> tuple[Embedding, dict[str, np.ndarray]]:
    """Bytes from `pack` → `(embedding with numpy features, the same arrays by name)`."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + 4 or bytes(view[:len(MAGIC)]) != MAGIC:
        raise EmbeddingFormatError(f"not an embedding: expected {MAGIC!r} first, got {bytes(view[:8])!r}")
    (length,) = struct.unpack_from("<I", view, len(MAGIC))
    start = len(MAGIC) + 4
    if length > _MAX_HEADER or start + length > len(view):
        raise EmbeddingFormatError(f"embedding header of {length} bytes does not fit in {len(view)} bytes")
    try:
        header = json.loads(bytes(view[start:start + length]))
        payload = view[start + length:]
        if header["size"] != len(payload):
            raise EmbeddingFormatError(f"embedding torn: {len(payload)} of {header['size']} array bytes")
        if zlib.crc32(payload) != header["crc32"]:
            raise EmbeddingFormatError("embedding damaged: crc32 of the array bytes does not match")
        arrays: dict[str, np.ndarray] = {}
        for e in header["arrays"]:
            if e["dtype"] not in _ALLOWED_DTYPES:
                raise EmbeddingFormatError(f"{e['name']}: dtype {e['dtype']!r} is not allowed")
            dtype = np.dtype(e["dtype"])
            shape = tuple(int(v) for v in e["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            end = int(e["offset"]) + count * dtype.itemsize
            if int(e["offset"]) < 0 or end > len(payload) or min(shape, default=0) < 0:
                raise EmbeddingFormatError(f"{e['name']}: extent {e['offset']}..{end} outside the payload")
            arrays[str(e["name"])] = np.frombuffer(payload, dtype, count, int(e["offset"])).reshape(shape).copy()
        w, h = header["image_size"]
        embedding = Embedding(str(header["engine_id"]), ImageSize(int(w), int(h)), arrays, dict(header["meta"]))
    except EmbeddingFormatError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise EmbeddingFormatError(f"embedding header unreadable ({exc.__class__.__name__}: {exc})") from None
    return embedding, arrays
