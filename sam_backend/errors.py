"""The one error shape that may reach a client: a message safe to show and the HTTP status that fits."""

from __future__ import annotations


class ClientError(Exception):
    """Raised where the cause is the request, its image or its upstream; `message` carries no secret."""

    default_status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status or self.default_status
