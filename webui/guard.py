"""Who may use the web page: by default only this machine.

``LocalOnly(app)`` wraps an ASGI app. It refuses (HTTP 403, or closes a websocket) requests whose client is
not a loopback address, and requests whose Host header names another machine, so that a web page elsewhere
that points a name at 127.0.0.1 (DNS rebinding) cannot drive the server. ``allow_remote=True`` lets all in.
"""
from __future__ import annotations

import ipaddress

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "testclient"        # starlette's TestClient


class LocalOnly:
    """ASGI guard: refuse requests from other machines, and Host headers other than this machine's
    (a web page elsewhere that points a name at 127.0.0.1 cannot drive the server: DNS rebinding)."""

    def __init__(self, app, allow_remote: bool = False):
        self.app = app
        self.allow_remote = allow_remote

    def allowed(self, scope) -> bool:
        if self.allow_remote or scope["type"] not in ("http", "websocket"):
            return True
        client = scope.get("client")
        if not _is_loopback(client[0] if client else None):
            return False
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        return name in LOCAL_HOSTS or _is_loopback(name) or name == "testserver"

    async def __call__(self, scope, receive, send):
        if self.allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"refused: this server only answers this machine (start it with --host to allow others)\n"
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
