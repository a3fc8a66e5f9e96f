"""The intake's route table: (method, path) -> handler, served by aiohttp's low-level server.

Why not aiohttp's web.Application and its router: per request it resolves the URL
through the router, builds a match-info object, a full Request and the middleware chain.
Issue 12 (E24) measured the switch on the tree with every other part-E simplification in
it: 12,400 more instructions per single event with the router (299.6k to 312.0k,
bench/callgrind_intake.py; 21,000 more again with a middleware for Intercom's error
shape), and single events at 0.69x the bare aiohttp handler (bench/run_intake.py, 20
interleaved pairs), under the 0.7x floor. So it stays a dict lookup: the intake has six
fixed paths and no path parameters. bench/RESULTS.md has the figures and commands.

What the router did that still matters is kept here: 404 for an unknown path, 405 with an
Allow header for a known path and the wrong method, HEAD served by the GET handler, and
"Expect: 100-continue" answered before the handler reads the body (curl sends it for
bodies over 1 KiB and would otherwise wait a second before sending the batch).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import HttpVersion11, web

JSON = "application/json"

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An answer in the shape Intercom's API uses for errors."""
    err: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return web.Response(status=status, body=orjson.dumps({"type": "error.list", "errors": [err]}),
                        content_type=JSON, headers=headers)


class Routes:
    """Fixed routes, matched on the exact method and path; `dispatch` is the server's handler."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._methods: dict[str, list[str]] = {}  # path -> methods, for 405's Allow

    def add(self, method: str, path: str, handler: Handler) -> None:
        methods = (method, "HEAD") if method == "GET" else (method,)
        for m in methods:
            if (m, path) in self._handlers:
                raise ValueError(f"route {m} {path} is already taken")
            self._handlers[(m, path)] = handler
            self._methods.setdefault(path, []).append(m)

    def dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain function that returns the handler's coroutine for aiohttp to await, so a
        # request runs in one coroutine, not two (the server only awaits what it gets).
        # raw_path is the request target as sent: no URL object is built and decoded for it.
        # It carries any query string or %-escapes, so on a miss the decoded path decides.
        handler = self._handlers.get((request.method, request.raw_path))
        if handler is None:
            handler = self._handlers.get((request.method, request.path))
            if handler is None:
                return self._no_route(request)
        if "Expect" in request.headers:
            return self._expect_then(request, handler)
        return handler(request)

    async def _expect_then(self, request: web.BaseRequest,
                           handler: Handler) -> web.StreamResponse:
        refused = await self._expect(request)
        if refused is not None:
            return refused
        return await handler(request)

    async def _no_route(self, request: web.BaseRequest) -> web.Response:
        allowed = self._methods.get(request.path)
        if allowed is None:
            return error_response(404, "not_found",
                                  f"no route {request.path}; see the README for the routes")
        return error_response(405, "method_not_allowed",
                              f"{request.method} is not allowed on {request.path}",
                              headers={"Allow": ", ".join(sorted(allowed))})

    @staticmethod
    async def _expect(request: web.BaseRequest) -> web.Response | None:
        """What aiohttp's router does for Expect: 100-continue; None means go on."""
        if request.version != HttpVersion11:
            return None
        expect = request.headers["Expect"]
        if expect.lower() != "100-continue":
            return error_response(417, "expectation_failed", f"unknown Expect: {expect}",
                                  field="Expect")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the response proper
        return None
