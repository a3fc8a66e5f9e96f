"""`python -m forwarder.healthcheck`: exit 0 when GET /healthz answers 200 in time, else 1.

The container image's HEALTHCHECK runs this so the image needs no curl. Standard library
only, and deliberately not urllib.request: that honours HTTP(S)_PROXY, so in an environment
with a proxy set it would send a probe for 127.0.0.1 to the proxy. http.client connects
where it is told.

Defaults follow the daemon's own settings: port from FORWARDER_INTAKE__PORT, host from
FORWARDER_INTAKE__HOST (a wildcard such as 0.0.0.0 is probed on loopback). `--unix-socket`
probes the intake's Unix socket instead. One line goes to stderr on failure, which Docker
keeps in `docker inspect`'s health log.

This is a standalone probe process, not a stage, so it reads the environment and the
monotonic clock itself (the style guide's Clock injection is for the daemon's stages).
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from .client import UnixHTTPConnection

DEFAULT_PORT = 8377
DEFAULT_TIMEOUT_S = 2.0
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def default_url(env: Mapping[str, str]) -> str:
    port = env.get("FORWARDER_INTAKE__PORT", "").strip() or str(DEFAULT_PORT)
    host = env.get("FORWARDER_INTAKE__HOST", "").strip()
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def probe(url: str, *, unix_socket: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> str | None:
    """None when `url` answers 200 within `timeout_s` in all; otherwise why not."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not (parts.hostname or unix_socket):
        return f"unsupported url {url!r}: only http:// is probed"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + timeout_s
    if unix_socket:
        conn: http.client.HTTPConnection = UnixHTTPConnection(unix_socket, timeout_s)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    try:
        conn.connect()
        # The socket timeout is per operation; shrink it so the whole probe fits timeout_s.
        if conn.sock is not None:
            conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
        conn.request("GET", target, headers={"Accept": "application/json"})
        response = conn.getresponse()
        response.read(65536)
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    finally:
        conn.close()
    if time.monotonic() > deadline:
        return f"answered {response.status} after the {timeout_s:g}s limit"
    if response.status != 200:
        return f"status {response.status}"
    return None


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m forwarder.healthcheck",
        description="Exit 0 when the forwarder's /healthz answers 200 in time, else 1.",
    )
    parser.add_argument(
        "--url",
        default=default_url(env),
        help="default: http://127.0.0.1:$FORWARDER_INTAKE__PORT/healthz (port 8377)",
    )
    parser.add_argument(
        "--unix-socket",
        default="",
        metavar="PATH",
        help="send the request over this Unix socket (the URL's path is used)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"the whole probe's limit (default {DEFAULT_TIMEOUT_S:g})",
    )
    args = parser.parse_args(argv)
    where = f"{args.url} via {args.unix_socket}" if args.unix_socket else args.url
    failure = probe(args.url, unix_socket=args.unix_socket, timeout_s=args.timeout)
    if failure is not None:
        print(f"unhealthy: {where}: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
