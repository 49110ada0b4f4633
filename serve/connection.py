"""The HTTP connections of `embedctl serve`: uvicorn's HTTP/1.1 protocol (httptools) with the limits it lacks
against clients that never finish their requests.

uvicorn closes a kept-alive connection that stays silent (`timeout_keep_alive`), but a connection that sends nothing
after connecting, or half of a request's headers, is held forever and reaches no app that could time it out: enough
of them (slowloris) hold every socket the worker may open. Here a request's headers must arrive within
`header_timeout` seconds of the connection (or of the request's first byte on a kept-alive connection); a late
connection is answered 408 (closed silently if it sent nothing) and closed. Its body must then arrive within
`body_timeout` seconds of its headers, whether or not the app reads it (the answers to /health or to a missing API key
do not, and each byte the client sends puts uvicorn's keep-alive timer off): a late one is answered 408, or just
closed once the app's answer began. A connection whose answer is complete while its body is still coming is closed
(as uvicorn's h11 protocol does): the rest of the body would be read as the next request. Past `max_connections` open
connections a request is answered 503 and its connection closed: uvicorn's `limit_concurrency`, in OpenAI's error
shape.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import sys
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from embedctl.serve.config import ServeConfig
from embedctl.serve.protocol import ApiError, send_error

LOG = logging.getLogger("embedctl.serve")

SPARE_FILES = 256
"""Open files a worker needs beside its connections (the model's and indexes' files, the metrics, the loop's)."""


class Connection(HttpToolsProtocol):
    """One client connection; uvicorn makes one per accepted socket (`uvicorn_options`)."""

    def __init__(self, *args, header_timeout: float, body_timeout: float, max_connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self._timer: asyncio.TimerHandle | None = None  # the deadline of the current request's headers, then body
        self._begun = False  # a byte of a request arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer = self.loop.call_later(self.header_timeout, self._late)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._timer is None:  # the next request of a kept-alive connection (the first's counts from connecting)
            self._timer = self.loop.call_later(self.header_timeout, self._late)

    def on_headers_complete(self) -> None:
        self._stop()
        if len(self.connections) <= self.max_connections:
            super().on_headers_complete()
        else:
            LOG.warning("%d open connections (--max-connections %d): answering 503", len(self.connections),
                        self.max_connections)
            app, self.app = self.app, self._busy  # uvicorn runs self.app for the request it has just parsed
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        if not self.pipeline:  # a request queued behind another's answer is not read yet: its time starts then
            self._timer = self.loop.call_later(self.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        self._stop()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if not self.pipeline and self.cycle.more_body and not self.transport.is_closing():
            self.transport.close()  # answered before its body came: the rest of the body would parse as a request
        super().on_response_complete()
        if self.pipeline or self.transport.is_closing() or not self.cycle.more_body or self._timer is not None:
            return
        self._timer = self.loop.call_later(self.body_timeout, self._body_late)  # its queued request's turn came

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        """The headers did not arrive in time."""
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a late pipelined request behind one being answered: close after that
            return
        if self._begun:
            self.transport.write(_raw(ApiError(
                408, f"the request headers did not arrive within {self.header_timeout:g} s (--header-timeout)",
                code="request_timeout", close=True)))
        self.transport.close()

    def _body_late(self) -> None:
        """The body did not arrive in time (whether or not the app is reading it)."""
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing():
            return
        if not cycle.response_started:
            self.transport.write(_raw(ApiError(
                408, f"the request body did not arrive within {self.body_timeout:g} s of its headers "
                     "(--body-timeout); send it at once", code="request_timeout", close=True)))
        cycle.disconnected = True  # what the app still sends goes nowhere, and it reads a disconnect
        cycle.message_event.set()
        self.transport.close()

    async def _busy(self, scope, receive, send) -> None:
        await send_error(send, ApiError(
            503, f"the server holds {len(self.connections)} connections, its limit (--max-connections "
                 f"{self.max_connections}); retry shortly", type="server_error", code="overloaded", close=True))


def _raw(error: ApiError) -> bytes:
    """`error` as a whole HTTP/1.1 response, for a connection that never reached the app."""
    body = error.payload()
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def uvicorn_options(config: ServeConfig) -> dict:
    """What `uvicorn.run` takes to serve with these connections (in the server process, before the workers start:
    they inherit its limit of open files, raised here to hold --max-connections sockets each)."""
    _reserve_files(config.max_connections)
    return {"http": functools.partial(Connection, header_timeout=config.header_timeout,
                                      body_timeout=config.body_timeout, max_connections=config.max_connections)}


def _reserve_files(max_connections: int) -> None:
    """Raise the soft limit of open files to `max_connections` plus SPARE_FILES, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_FILES
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        print(f"WARNING:  a worker may open {new} files (ulimit -Hn), fewer than --max-connections {max_connections} "
              f"plus {SPARE_FILES}: raise the hard limit or lower --max-connections", file=sys.stderr, flush=True)
