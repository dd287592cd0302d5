"""A fault-injecting TCP proxy on 127.0.0.1 in front of an HTTP server (moto's S3 on loopback).

Each client request is read whole (request line, headers, ``Content-Length`` body), matched against a
fault plan by method and path (``PUT /bucket/prefix/_daunce/commits/p3.json``), and then relayed on a
kept-alive upstream connection (moto spends ~14 ms on each new one); the reply goes back with
``Connection: close``, so one client connection carries one request and a fault on it touches nothing
else. Faults fire on the N-th request a rule matches (counted in arrival order), never on a timer:

- ``reset``: the connection is reset before the request is forwarded (nothing reached the server);
- ``drop_reply``: the request is forwarded and the server's whole reply read (the write landed), then the
  client's connection is reset: it never hears;
- ``status``: an error reply (default 500 InternalError) without forwarding;
- ``delay``: the request is held ``seconds`` before it is forwarded (a slow store, not an aimed wait);
- ``hang``: forwarded, then the reply is withheld until the client gives up (its request timeout) or the
  proxy closes: a reply lost without a reset.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Literal
from urllib.parse import unquote

Action = Literal["reset", "drop_reply", "status", "delay", "hang"]


@dataclass
class Fault:
    """Apply ``action`` to requests ``nth`` .. ``nth + times - 1`` (1-based) of those whose method is
    ``method`` (None: any) and whose path matches the regular expression ``path`` (``re.search``)."""

    action: Action
    path: str = ""
    method: str | None = None
    nth: int = 1
    times: int = 1
    status: int = 500
    seconds: float = 0.0
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.path, path) is not None


@dataclass
class Request:
    method: str
    path: str
    action: str  # "forward" or the fault applied


@dataclass
class FaultProxy:
    """Listen on 127.0.0.1 (a free port) and relay to ``upstream`` (host, port), applying ``faults``."""

    upstream: tuple[str, int]
    faults: list[Fault] = field(default_factory=list)
    log: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._idle: list[tuple[socket.socket, BinaryIO]] = []  # kept-alive upstream connections
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def plan(self, *faults: Fault) -> list[Fault]:
        """Replace the fault plan (counts start again) and clear the request log."""
        with self._lock:
            self.faults = list(faults)
            self.log.clear()
        return self.faults

    def requests(self, method: str | None = None, path: str = "") -> list[Request]:
        """The requests seen so far, optionally only those matching ``method`` and ``path``."""
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method) and re.search(path, r.path)]

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for up, _ in self._idle:
                up.close()
            self._idle.clear()

    # --- relaying ---------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _decide(self, method: str, path: str) -> Fault | None:
        with self._lock:
            chosen = None
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.seen += 1
                    if chosen is None and fault.nth <= fault.seen < fault.nth + fault.times:
                        fault.fired += 1
                        chosen = fault
            self.log.append(Request(method, path, chosen.action if chosen else "forward"))
            return chosen

    def _serve(self, client: socket.socket) -> None:
        try:
            head, body = _read_request(client)
            if head is None:
                client.close()
                return
            method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
            path = unquote(target.split("?", 1)[0])
            fault = self._decide(method, path)
            action = fault.action if fault else None
            if action == "reset":
                _reset(client)
                return
            if action == "status":
                assert fault is not None
                client.sendall(_error_reply(fault.status))
                client.close()
                return
            if action == "delay":
                assert fault is not None
                time.sleep(fault.seconds)
            reply = self._forward(method, head, body)
            if action == "drop_reply":
                _reset(client)
                return
            if action == "hang":
                # Hold the reply until the client times out and closes (or the proxy shuts down).
                client.settimeout(0.5)
                while not self._closed.is_set():
                    try:
                        if client.recv(1 << 16) == b"":
                            break
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                client.close()
                return
            client.sendall(reply)
            client.close()
        except OSError:
            client.close()

    def _forward(self, method: str, head: bytes, body: bytes) -> bytes:
        """Send the request upstream and return the whole reply (its head saying ``Connection: close``)."""
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        if pooled is not None:
            try:
                return self._exchange(pooled, method, head, body)
            except EOFError:  # the server had closed the idle connection before reading: nothing was sent
                pooled[0].close()
        up = socket.create_connection(self.upstream)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._exchange((up, up.makefile("rb")), method, head, body)

    def _exchange(self, conn: tuple[socket.socket, BinaryIO], method: str, head: bytes, body: bytes) -> bytes:
        up, reader = conn
        up.sendall(head + body)
        status_line = reader.readline()
        if not status_line:
            raise EOFError
        lines = [status_line]
        while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
            lines.append(line)
        reply_head = b"".join(lines) + b"\r\n"
        headers = reply_head.lower()
        status = int(status_line.split()[1])
        length = re.search(rb"\r\ncontent-length:\s*(\d+)", headers)
        keep = b"\r\nconnection: close" not in headers
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            reply_body = b""
        elif length is not None:
            reply_body = reader.read(int(length.group(1)))
        else:
            assert b"transfer-encoding: chunked" not in headers, "the fault proxy relays Content-Length replies only"
            reply_body, keep = reader.read(), False
        if keep:
            with self._lock:
                self._idle.append(conn)
        else:
            up.close()
        return _with_close(reply_head) + reply_body


def _read_request(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """One HTTP/1.1 request: its head (through the blank line) and its ``Content-Length`` body."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1 << 16)
        if not data:
            return None, b""
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head, body = buf[:end], buf[end:]
    headers = head.lower()
    assert b"transfer-encoding: chunked" not in headers, "the fault proxy relays Content-Length bodies only"
    length = re.search(rb"\r\ncontent-length:\s*(\d+)", headers)
    want = int(length.group(1)) if length else 0
    while len(body) < want:
        data = sock.recv(1 << 16)
        if not data:
            break
        body += data
    return head, body


def _with_close(head: bytes) -> bytes:
    """``head`` (request or reply head, through the blank line) saying ``Connection: close``."""
    lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _error_reply(status: int) -> bytes:
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
        b"<Message>injected by the fault proxy</Message></Error>"
    )
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
