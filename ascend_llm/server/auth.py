"""--api-key: Bearer-token check on the routed path, compared in constant time."""
from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from ascend_llm.server.errors import error_body

PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics"})


class APIKeyMiddleware:
    """Rejects HTTP requests without `Authorization: Bearer <key>` (401), except PUBLIC_PATHS.

    Uses `scope["path"]` (what the router matches), never a URL rebuilt from the Host header.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body(401, "Unauthorized: send 'Authorization: Bearer <api key>'")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: Scope) -> bool:
        values = [v for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        return hmac.compare_digest(values[0], self._expected)
