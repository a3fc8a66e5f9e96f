"""The intake's routes on aiohttp's own router (a web.Application), with every error answer
in the shape Intercom's API uses.

aiohttp does the HTTP work: 404 for an unknown path, 405 with an Allow header for a known
path and the wrong method, HEAD served by the GET handler, "Expect: 100-continue"
answered before the handler reads the body (curl sends it for bodies over 1 KiB and would
otherwise wait a second before sending a batch), and the body limit (client_max_size:
request.read() raises 413 with or without a Content-Length). What is ours is the shape of
those refusals: a middleware turns 404 and 405 into Intercom's error.list, and an expect
handler does the same for 417, so an app sees one error shape from every route.

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
        app = web.Application(client_max_size=max_body_bytes, middlewares=[_intercom_errors])
        resources: dict[str, web.Resource] = {}  # one per path, so 405 lists every method
        for method, path, handler in self._routes:
            resource = resources.get(path)
            if resource is None:
                resource = resources[path] = app.router.add_resource(path)
            if method == hdrs.METH_GET:
                resource.add_route(hdrs.METH_HEAD, handler, expect_handler=_expect)
            resource.add_route(method, handler, expect_handler=_expect)
        return app


@web.middleware
async def _intercom_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The router's 404 and 405 (raised by the handler it resolved) in Intercom's shape."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        return error_response(405, "method_not_allowed",
                              f"{request.method} is not allowed on {request.path}",
                              headers={"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound:
        return error_response(404, "not_found",
                              f"no route {request.path}; see the README for the routes")


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's default expect handler, except that its 417 is in Intercom's shape: the
    router calls this before (and outside) the middleware, so the middleware cannot."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers[hdrs.EXPECT]
    if expect.lower() != "100-continue":
        return error_response(417, "expectation_failed", f"unknown Expect: {expect}",
                              field="Expect")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the 100 is not part of the response proper
    return None
