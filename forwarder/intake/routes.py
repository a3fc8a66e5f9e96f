"""The intake's routes on aiohttp's own router (a web.Application), with every refusal
in the shape Intercom's API uses.

aiohttp's router matches (method, path), serves HEAD with the GET handler, answers
"Expect: 100-continue" before the handler reads the body (curl sends it for bodies over
1 KiB and would otherwise wait a second before sending a batch), and enforces the body
limit (client_max_size: request.read() raises 413 with or without a Content-Length).
What is ours is the answer to what it refuses, so an app sees one error shape from every
route (aiohttp's own 404/405/417 are plain text): a catch-all route, added last, gets
every request no route took and answers 404, or 405 with Allow when the path is known;
an expect handler answers an unknown Expect with 417.

Why a catch-all route and not a middleware (aiohttp's usual place to reshape errors): a
middleware wraps every request, +21,000 instructions per single event (303k to 324k,
bench/callgrind_intake.py), which would have taken the single-event figure to the floor;
the catch-all runs only when nothing else matched.

Until issue 12 (E24) a dict lookup on aiohttp's low-level web.Server did the routing, for
~6% fewer instructions per single event, at the price of re-implementing all of the
above. bench/RESULTS.md ("before and after issue 12 part E") shows the router keeps the
single-event floor (>= 0.7x the bare aiohttp handler).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import HttpVersion11, hdrs, web

JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An answer in the shape Intercom's API uses for errors."""
    err: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return web.Response(status=status, body=orjson.dumps({"type": "error.list", "errors": [err]}),
                        content_type=JSON, headers=headers)


class Routes:
    """The intake's route table: (method, path) -> handler, GET routes also serving HEAD.
    `application()` builds the aiohttp Application that serves it (listen.py runs it)."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, str, Handler]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        if any((m, p) == (method, path) for m, p, _ in self._routes):
            raise ValueError(f"route {method} {path} is already taken")
        self._routes.append((method, path, handler))

    def application(self, *, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes)
        resources: dict[str, web.Resource] = {}  # one per path, in the order added
        for method, path, handler in self._routes:
            resource = resources.get(path)
            if resource is None:
                resource = resources[path] = app.router.add_resource(path)
            if method == hdrs.METH_GET:
                resource.add_route(hdrs.METH_HEAD, handler, expect_handler=_expect)
            resource.add_route(method, handler, expect_handler=_expect)
        # The router tries the exact paths first and this last, for any path and method.
        app.router.add_route("*", "/{path:.*}", self._no_route, expect_handler=_expect)
        return app

    async def _no_route(self, request: web.Request) -> web.Response:
        allowed = {m for m, path, _ in self._routes if path == request.path}
        if not allowed:
            return error_response(404, "not_found",
                                  f"no route {request.path}; see the README for the routes")
        if hdrs.METH_GET in allowed:
            allowed.add(hdrs.METH_HEAD)
        return error_response(405, "method_not_allowed",
                              f"{request.method} is not allowed on {request.path}",
                              headers={"Allow": ", ".join(sorted(allowed))})


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's default expect handler, except that its 417 is in Intercom's shape."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers[hdrs.EXPECT]
    if expect.lower() != "100-continue":
        return error_response(417, "expectation_failed", f"unknown Expect: {expect}",
                              field="Expect")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the 100 is not part of the response proper
    return None
