"""Who may talk to the server: the Host check (against DNS rebinding) and the token (off loopback).

A web page the user visits elsewhere can point a name it controls at 127.0.0.1 and then read this server as
its own origin; the browser still sends that name in ``Host``. So every request, on every route (an ASGI
middleware: routes added later are covered by construction), must name an allowed host: the loopback names,
the bound address, and the ``--allowed-host`` names. Off loopback every request must also carry the token
(as Jupyter does): ``?token=`` once (answered with a cookie and a redirect to the same URL without it), the
cookie, or ``Authorization: token <token>`` for scripts. And a page of another site may not make the browser
send requests here (the Host check cannot see those: the Host is ours): a request whose ``Origin`` names another
host is refused, and so is a cross-site subresource (``Sec-Fetch-Site: cross-site``: an ``<img>`` or ``<script>``
pointing here, which could start expensive work); following a link here (a navigation) stays allowed. A
request body (a POST route's text) must state its length, at most ``MAX_BODY_BYTES``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import secrets
from collections.abc import Sequence
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from daunce_store.errors import InvalidInputError

__all__ = ["Access", "AccessGuard", "is_loopback", "new_token"]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")  # bind-all addresses: no client names them in Host
MAX_BODY_BYTES = 1 << 20  # a request body (e.g. a prompt and completion to attribute): 1 MiB


def is_loopback(host: str) -> bool:
    """``host`` (a name or an address) is this machine only."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _host_name(header: str) -> str:
    """The name of a Host header, without its port: ``[::1]:8000`` -> ``::1``, ``Example.org.:80`` -> ``example.org``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


@dataclasses.dataclass(frozen=True)
class Access:
    """The access rules of one server: ``host`` it binds, extra ``allowed_hosts`` for the Host check, the
    ``token`` every request must carry (None: none), and ``no_token`` (off loopback without a token: the
    user said so). Off loopback with neither is refused: anyone who can reach the port could read the data."""

    host: str = "127.0.0.1"
    allowed_hosts: Sequence[str] = ()
    token: str | None = None
    no_token: bool = False

    def __post_init__(self) -> None:
        if self.token is not None and self.no_token:
            raise InvalidInputError("give --token or --no-token, not both")
        if self.token is not None and len(self.token) < 16:
            raise InvalidInputError(f"--token must be at least 16 characters (it guards the data), not {len(self.token)}")
        if not is_loopback(self.host) and self.token is None and not self.no_token:
            raise InvalidInputError(f"--host {self.host} is off loopback: anyone who can reach it would read the data; "
                                    "serve with a token (the default of `daunce serve`, or --token) or say --no-token")
        for name in self.allowed_hosts:
            if not name or "/" in name or " " in name:
                raise InvalidInputError(f"--allowed-host {name!r}: give a host name or address, e.g. --allowed-host myhost.lan")

    @property
    def hosts(self) -> tuple[str, ...]:
        """The names a request's Host may carry."""
        bound = () if self.host in WILDCARDS else (_host_name(self.host if ":" not in self.host else f"[{self.host}]"),)
        return tuple(dict.fromkeys([*LOOPBACK_NAMES, *bound, *(_host_name(h) for h in self.allowed_hosts)]))

    def allows_host(self, header: str) -> bool:
        name = _host_name(header)
        return name in self.hosts or (is_loopback(name) and name != "")


class AccessGuard:
    """ASGI middleware enforcing :class:`Access` on every HTTP request before any route sees it."""

    def __init__(self, app: Any, access: Access):
        self.app = app
        self.access = access

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.access.allows_host(host):
            await _refuse(send, 403, f"Host {host!r} is not one this server answers to ({', '.join(self.access.hosts)}): "
                                     f"open it by one of those names, or start it with --allowed-host {_host_name(host) or 'NAME'}")
            return
        origin = headers.get("origin")
        if origin is not None and not self.access.allows_host(urlsplit(origin).netloc):
            await _refuse(send, 403, f"a page of {origin!r} may not send requests to this server (Origin not one of {', '.join(self.access.hosts)})")
            return
        if headers.get("sec-fetch-site") == "cross-site" and headers.get("sec-fetch-mode") != "navigate":
            await _refuse(send, 403, "a page of another site may not load this server's resources; open the page itself")
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length", "")
            if not length.isdigit():
                await _refuse(send, 411, "send the request body with a Content-Length (chunked bodies are not taken)")
                return
            if int(length) > MAX_BODY_BYTES:
                await _refuse(send, 413, f"a request body of {int(length)} bytes is over this server's cap of {MAX_BODY_BYTES}")
                return
        token = self.access.token
        if token is None:
            await self.app(scope, receive, send)
            return
        cookie_name = f"daunce-token-{(scope.get('server') or ('', 0))[1]}"  # per port: two servers on one host
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given and _same(given[0], token) and scope["method"] in ("GET", "HEAD"):
            # Once from the printed URL: a cookie for the page's own requests, and the URL without the token
            # (so it is not kept in the history nor in a link copied from the address bar).
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
            await send({"type": "http.response.start", "status": 303, "headers": [
                (b"location", location.encode("latin-1")),
                (b"set-cookie", f"{cookie_name}={token}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1")),
                (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no token
            cookie = SimpleCookie()
        scheme, _, value = headers.get("authorization", "").partition(" ")
        offered = [cookie[cookie_name].value] if cookie_name in cookie else []
        if scheme.lower() in ("token", "bearer"):
            offered.append(value.strip())
        offered += given
        if any(_same(t, token) for t in offered):
            await self.app(scope, receive, send)
            return
        await _refuse(send, 401, "this server needs its token: open the URL `daunce serve` printed (…/?token=…), "
                                 "or send the header `Authorization: token <token>`")


def _same(offered: str, token: str) -> bool:
    return secrets.compare_digest(offered.encode("utf-8", "replace"), token.encode())  # constant time, any text


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
