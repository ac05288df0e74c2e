"""A stand-in for Label Studio's annotation API, for the tests of learning that would otherwise need a 30 s Label
Studio start each (the real one is used in `test_adapt.py`'s integration test): a loopback HTTP server that answers
`GET /api/annotations/<id>/` and `GET /api/tasks/<id>/` from what the test put there, only with the right legacy
token, as Label Studio 1.23 does (404 for what it does not hold, 401 without the key)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from sam_backend.labelstudio.brush import encode_brush

KEY = "0123456789abcdef0123456789abcdef01234567"  # a legacy token (40 hex digits): sent as `Token <key>`
LABEL = "Object"


def brush_region(region_id: str, mask: np.ndarray, size: tuple[int, int] | None = None,
                 label: str = LABEL) -> dict[str, Any]:
    h, w = size or mask.shape
    return {"id": region_id, "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_brush(mask), "brushlabels": [label]}}


class LabelStudioStandIn:
    """Annotations and tasks by id; `webhook(...)` returns the body Label Studio would post for one."""

    def __init__(self) -> None:
        self.annotations: dict[int, dict[str, Any]] = {}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.down = False  # answer 503 to everything
        self.asked: list[str] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def env(self) -> dict[str, str]:
        return {"LABEL_STUDIO_URL": self.url, "LABEL_STUDIO_API_KEY": KEY}

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def annotate(self, project: int, annotation: int, image: str, mask: np.ndarray | None = None, *,
                 task: int | None = None, cancelled: bool = False, size: tuple[int, int] | None = None,
                 regions: list[dict[str, Any]] | None = None, action: str = "ANNOTATION_CREATED") -> dict[str, Any]:
        """Hold annotation `annotation` of a task (default id: the annotation's) with one brush region of `mask`
        (or `regions`), and return Label Studio's webhook body for it."""
        task = task or annotation
        result = regions if regions is not None else [brush_region(f"r{annotation}", mask, size)]
        self.tasks[task] = {"id": task, "project": project, "data": {"image": image}}
        self.annotations[annotation] = {"id": annotation, "task": task, "project": project, "result": result,
                                        "was_cancelled": cancelled}
        return webhook_body(action, project, self.annotations[annotation], self.tasks[task])

    def delete(self, annotation: int) -> dict[str, Any]:
        """Delete it; returns the `ANNOTATIONS_DELETED` body."""
        gone = self.annotations.pop(annotation)
        return {"action": "ANNOTATIONS_DELETED", "project": {"id": gone["project"]},
                "annotations": [{"id": annotation}]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                standin.asked.append(self.path)
                if standin.down:
                    return self._send(503, {"detail": "down"})
                if self.headers.get("Authorization") != f"Token {KEY}":
                    return self._send(401, {"detail": "Authentication credentials were not provided."})
                found = re.fullmatch(r"/api/(annotations|tasks)/(\d+)/", self.path)
                table = {"annotations": standin.annotations, "tasks": standin.tasks}.get(found[1]) if found else None
                item = table.get(int(found[2])) if table is not None else None
                if item is None:
                    return self._send(404, {"detail": "Not found."})
                return self._send(200, item)

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def webhook_body(action: str, project: int, annotation: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    return {"action": action, "project": {"id": project}, "task": dict(task), "annotation": dict(annotation)}
