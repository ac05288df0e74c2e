"""Where a project's learning is kept: its folder under `SAM_ADAPTER_DIR` and, with a shared store, the versions
replicas take from each other.

A project's folder holds `masks.json` (its accepted masks in arrival order: COCO RLE, column-major, with the image
URL, task, annotation and label), `v<N>.pt` (a version: `segment.adapt.pack_version` bytes) and `current.json` (the
version serving clicks, what it was learnt from, its held-out scores, the last attempt). Every file is written
atomically (`fileio.write_atomic`): a reader sees the old file or the new one. A version is written before the
`current.json` that names it, so a crash between the two leaves the previous version serving.

In the shared store (`SAM_EMBEDDING_STORE`) a version is `adapter:<weights>:<project>:v<N>` and the pointer to the
newest `adapter:<weights>:<project>:current` (`{"version": N, "info": ...}`); `<weights>` is the engine's id without
its precision, so replicas of other weights never take it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam_backend.fileio import write_atomic
from sam_backend.labelstudio.accepted import AcceptedMask
from sam_backend.segment.adapt import AdaptError, unpack_version

log = logging.getLogger(__name__)


def mask_record(m: AcceptedMask) -> dict[str, Any]:
    """One accepted mask as a JSON-ready record (the mask as COCO RLE)."""
    rle = mask_utils.encode(np.asfortranarray(m.mask.astype(np.uint8)))
    return {"key": m.key, "task": m.task_id, "annotation": m.annotation_id, "image": m.image_url, "label": m.label,
            "size": [int(m.mask.shape[0]), int(m.mask.shape[1])], "counts": rle["counts"].decode("ascii"),
            "at": time.time()}


def record_mask(record: dict[str, Any]) -> np.ndarray:
    """`(H, W) bool` of a record (COCO RLE, column-major)."""
    return mask_utils.decode({"size": record["size"], "counts": record["counts"].encode("ascii")}).astype(bool)


def weights_of(engine: Any) -> str:
    """The weights an engine's id names (`sam/<model>/<digest>`), without its precision."""
    return engine.engine_id.rsplit("/", 1)[0]


class ProjectFolder:
    """One project's folder; reads that fail are logged and give nothing, writes say whether they happened."""

    def __init__(self, root: Path, project: str) -> None:
        self.project = project
        self.path = Path(root) / project

    def read_masks(self) -> list[dict[str, Any]]:
        try:
            data = json.loads((self.path / "masks.json").read_text())
            return [r for r in data.get("masks", []) if isinstance(r, dict) and "counts" in r and "image" in r]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, AttributeError) as exc:
            log.error("project %s: %s cannot be read (%s); starting from no accepted masks", self.project,
                      self.path / "masks.json", exc)
            return []

    def write_masks(self, records: list[dict[str, Any]]) -> bool:
        return self._write("masks.json", json.dumps({"project": self.project, "masks": records}).encode())

    def read_current(self) -> dict[str, Any] | None:
        """`current.json`, or None where there is none or it cannot be read (the base model serves)."""
        try:
            info = json.loads((self.path / "current.json").read_text())
            int(info["version"])
            return info
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("project %s: current.json cannot be read (%s); serving the base model", self.project, exc)
            return None

    def write_current(self, info: dict[str, Any]) -> bool:
        return self._write("current.json", json.dumps(info, indent=1).encode())

    def write_version(self, name: str, data: bytes) -> bool:
        return self._write(name, data)

    def read_version(self, name: str) -> bytes:
        """A version file's bytes; `OSError` where it cannot be read."""
        return (self.path / Path(name).name).read_bytes()

    def _write(self, name: str, data: bytes) -> bool:
        try:
            write_atomic(self.path / name, data)
            return True
        except OSError as exc:
            log.error("project %s: %s cannot be written in %s (%s)", self.project, name, self.path, exc)
            return False


class SharedVersions:
    """Versions published to the shared store, for replicas (see the module docstring)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @staticmethod
    def key(weights: str, project: str, version: int | None = None) -> str:
        return f"adapter:{weights}:{project}:{'current' if version is None else f'v{version}'}"

    def publish(self, weights: str, project: str, version: int, data: bytes, info: dict[str, Any]) -> None:
        self.store.put(self.key(weights, project, version), data)
        self.store.put(self.key(weights, project), json.dumps({"version": version, "info": info}).encode())

    def newer(self, weights: str, project: str, than: int) -> tuple[int, bytes, dict[str, Any]] | None:
        """`(version, bytes, info)` of the published version where it is newer than `than`, else None (a torn or
        foreign value is refused and logged)."""
        pointer = self.store.get(self.key(weights, project))
        try:
            published = json.loads(pointer) if pointer else None
        except ValueError:
            published = None
        if not isinstance(published, dict) or not isinstance(published.get("version"), int):
            return None
        version = published["version"]
        if version <= than:
            return None
        data = self.store.get(self.key(weights, project, version))
        if data is None:
            return None
        try:
            unpack_version(data)
        except AdaptError as exc:
            log.warning("project %s: the shared store's version %s is refused (%s)", project, version, exc)
            return None
        info = published.get("info")
        return version, data, info if isinstance(info, dict) else {}
