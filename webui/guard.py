"""Who may use the web page: by default only this machine, and never a page of another site.

``LocalOnly(app)`` wraps an ASGI app. It refuses (HTTP 403 with a one-line body; a websocket is closed
before it opens, which the server answers with 403):

- requests whose client is not a loopback address (unless ``allow_remote``);
- requests whose Host header names another machine, so that a web page elsewhere that points a name at
  127.0.0.1 (DNS rebinding) cannot drive the server (unless ``allow_remote``);
- always, also with ``allow_remote``: requests sent by a page of another site. A browser names the page
  that sends a request in its ``Origin`` header (every cross-site fetch, form post, EventSource and
  websocket) and, for a form post, at least in ``Referer``: an Origin, or for a method other than GET and
  HEAD a Referer, whose host:port is not the one the request is addressed to (its Host header) is refused.
  The page itself sends no Origin or its own, so same-origin use is untouched.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "testclient"        # starlette's TestClient


def _host_port(netloc: str, scheme: str) -> tuple[str, int] | None:
    """("name", port) of a Host header or URL netloc, the port defaulted by the scheme; None if unreadable."""
    try:
        parts = urlsplit("//" + netloc)
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.username is not None or parts.path:
        return None
    return name.lower().rstrip("."), port if port is not None else DEFAULT_PORTS.get(scheme, 80)


def _same_origin(url: str, host: str, scheme: str) -> bool:
    """Whether ``url`` (an Origin or Referer) names the host:port the request was sent to (its Host header)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False                       # "null" (a sandboxed frame, a file:// page), or junk
    mine = _host_port(host, scheme)
    return mine is not None and _host_port(parts.netloc, parts.scheme) == mine


def _site(url: str) -> str:
    """scheme://host:port of an Origin or Referer (no path: a Referer's path may be private), for messages."""
    try:
        parts = urlsplit(url)
        if parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}"[:100]
    except ValueError:
        pass
    return repr(url[:40])


class LocalOnly:
    """ASGI guard: refuse requests from other machines, Host headers other than this machine's (DNS rebinding),
    and requests made by a page of another site (a foreign Origin, or Referer on a non-GET request)."""

    def __init__(self, app, allow_remote: bool = False):
        self.app = app
        self.allow_remote = allow_remote

    def refusal(self, scope) -> str | None:
        """Why this request is refused (one line), or None when it may go on."""
        if scope["type"] not in ("http", "websocket"):
            return None
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.lower(), v)
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.allow_remote:
            client = scope.get("client")
            if not _is_loopback(client[0] if client else None):
                return "refused: this server only answers this machine (start it with --host to allow others)"
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if not (name in LOCAL_HOSTS or _is_loopback(name) or name == "testserver"):
                return "refused: this server only answers this machine (start it with --host to allow others)"
        scheme = scope.get("scheme", "http")
        origin = headers.get(b"origin")
        if origin is not None:
            sender = origin.decode("latin-1")
        elif scope["type"] == "http" and scope.get("method", "GET") not in ("GET", "HEAD") and b"referer" in headers:
            sender = headers[b"referer"].decode("latin-1")
        else:
            return None
        if _same_origin(sender, host, scheme):
            return None
        return f"refused: a page of another site ({_site(sender)}) may not use this server"

    def allowed(self, scope) -> bool:
        return self.refusal(scope) is None

    async def __call__(self, scope, receive, send):
        why = self.refusal(scope)
        if why is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})    # before accept: the server answers 403
            return
        body = (why + "\n").encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
