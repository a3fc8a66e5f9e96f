"""`intercom-forwarder`: turns argv into a Config, then runs the service or a sub-command.

Only what people change at a shell is a flag; everything else lives in the config file
and FORWARDER_<SECTION>__<KEY> variables (see docs/configuration.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import os
import signal
import sys
from pathlib import Path

import orjson

from . import __version__
from .config import Config, ConfigError, load_config, render_effective
from .preflight import preflight

EXIT_CONFIG = 2
EXIT_USAGE = 2  # as argparse's own usage errors
EXIT_REJECTED = 1  # send: the daemon answered 4xx; sending the same event again cannot help
EXIT_NOT_TAKEN = 3  # send: unreachable, or 503/5xx; the same event may be sent again later
SEND_TIMEOUT_S = 5.0
# Every reason a dead letter is written with: upstream.classify()'s DEAD_LETTER reasons
# (404 contact_not_found, any other 4xx rejected) and workers' retries_exhausted.
# unknown_outcome is for a summary whose answer had not come back when the stop's grace
# ran out (issue 12 A8): it is set aside, not resent, as summaries have no dedup key.
DEAD_LETTER_REASONS = ("contact_not_found", "rejected", "retries_exhausted", "unknown_outcome")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="PATH",
                   default=os.environ.get("FORWARDER_CONFIG") or None,
                   help="TOML config file (default: $FORWARDER_CONFIG, else built-in defaults)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intercom-forwarder",
        description="Local daemon that validates, de-duplicates and forwards Intercom data "
                    "events.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon")
    _config_arg(p)
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="event loop (auto: uvloop when installed)")

    sub.add_parser("demo", help="run the daemon against an embedded fake Intercom with a "
                                "realistic mix of events, and report what happened (no token)")

    # Its options are fake_intercom.main's own: main() hands the rest of argv over, so the
    # ~0.4 s import of aiohttp is paid only by this command.
    sub.add_parser("fake-intercom", add_help=False,
                   help="run a fake Intercom on 127.0.0.1:8378 to try the daemon by hand "
                        "(see fake-intercom --help)")

    p = sub.add_parser("check-config", help="check a config as serve would at start (every "
                                            "problem, one a line) and print the effective "
                                            "one (token redacted)")
    _config_arg(p)

    p = sub.add_parser("dead-letters", help="list or replay dead-lettered events")
    dl = p.add_subparsers(dest="dl_command", required=True, metavar="ACTION")
    for name, help_text in (("list", "print dead-lettered events, one JSON object a line"),
                            ("replay", ("re-submit them through a running daemon's intake; "
                                        "accepted ones are removed from the file"))):
        q = dl.add_parser(name, help=help_text)
        _config_arg(q)
        q.add_argument("--reason", choices=DEAD_LETTER_REASONS,
                       help="only entries with this reason")

    p = sub.add_parser("send", help="send one event to a running daemon (exit 0 accepted, "
                                    "1 rejected, 3 not taken or unreachable)")
    p.add_argument("event_name", metavar="EVENT_NAME")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", metavar="U")
    who.add_argument("--email", metavar="E")
    who.add_argument("--id", metavar="I", help="Intercom's contact id")
    p.add_argument("--created-at", type=int, metavar="N", help="Unix seconds (default: now)")
    p.add_argument("--metadata", action="append", default=[], metavar="K=V",
                   help="one metadata key, repeat for more; V is taken as JSON when it parses "
                        "(2999, true, "
                        "'{\"amount\":100,\"currency\":\"usd\"}'), else as a string")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="the daemon's intake, e.g. http://127.0.0.1:8377 "
                                     "(default: from the config's intake)")
    where.add_argument("--socket", metavar="PATH", help="the daemon's Unix socket")
    _config_arg(p)
    return parser


def _load(path: str | None) -> Config:
    return load_config(path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "fake-intercom":
        from .fake_intercom import main as fake_intercom_main
        return fake_intercom_main(rest, prog=f"{parser.prog} fake-intercom")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            from .demo import main as demo_main
            return demo_main()
        if args.command == "check-config":
            cfg = _load(args.config)
            if problems := preflight(cfg):
                return _refuse(problems)
            _check_fleet_redis(cfg)
            sys.stdout.write(render_effective(cfg))
            return 0
        if args.command == "dead-letters":
            return _dead_letters(args)
        if args.command == "send":
            return _send(args)
    except ConfigError as exc:
        return _refuse([exc])
    except KeyboardInterrupt:
        return 130
    return 2


def _check_fleet_redis(cfg: Config) -> None:
    """check-config only: whether the fleet's Redis answers. Never a refusal: serve starts
    and runs without Redis (fail open, docs/fleet.md), so this is a note on stderr."""
    if not cfg.fleet.redis_url:
        return
    from .fleet_redis import probe_once

    why = probe_once(cfg.fleet.redis_url.reveal())
    if why is None:
        print("intercom-forwarder: fleet.redis_url: Redis answered PING", file=sys.stderr)
    else:
        print(f"intercom-forwarder: warning: fleet.redis_url: Redis did not answer ({why}); "
              "serve would start and run on local dedup and a local budget until it does",
              file=sys.stderr)


def _refuse(problems: list[ConfigError]) -> int:
    for problem in problems:
        print(f"intercom-forwarder: config error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _serve(args: argparse.Namespace) -> int:
    from .logs import configure_logging
    from .notify import SystemdNotifier, listen_fds
    from .service import Service

    cfg = _load(args.config)
    # Taken once: each call wraps the passed fds in new socket objects.
    sockets = listen_fds(os.environ)
    if problems := preflight(cfg, socket_activated=bool(sockets)):
        return _refuse(problems)  # before any log line: nothing has started
    configure_logging(cfg.log.level, cfg.log.format)
    _install_loop(args.loop)

    async def _main() -> int:
        service = Service(cfg, notifier=SystemdNotifier.from_env(os.environ),
                          listen_sockets=sockets,
                          reload_config=lambda: _load(args.config))  # SIGHUP
        freeze_startup_heap()
        code = await service.run()
        # Everything is delivered or spooled now: a late SIGTERM (systemd, a test, an
        # impatient operator) must not turn this exit 0 into death by signal in teardown.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        return code

    try:
        return asyncio.run(_main())
    except OSError as exc:  # e.g. the port is taken
        print(f"intercom-forwarder: cannot start: {exc}", file=sys.stderr)
        return 1


def freeze_startup_heap() -> None:
    """Take everything built before serving (modules, config, the service, its queue and
    dedup window) out of the cycle collector's sight, once per process.

    A full collection walks every container it tracks, and the queue's deque is walked
    item by item: under single-event load, full collections stalled the daemon for ~25 ms
    every several seconds, and every request in flight waited it out. Frozen, they take
    under 1 ms (bench/gc_pauses.py; the slowest requests gain most). Nothing built here
    is ever garbage, and gc.collect() runs first so that no start-up garbage is frozen
    with it. Per process, not per Service: tests build many services in one process.
    """
    gc.collect()
    gc.freeze()


def _install_loop(choice: str) -> None:
    if choice == "asyncio":
        return
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--loop", "uvloop is not installed "
                                        "(pip install 'intercom-forwarder[uvloop]')") from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _dead_letters(args: argparse.Namespace) -> int:
    from .deadletter import read_entries, replay
    from .logs import configure_logging

    cfg = _load(args.config)
    # stdout carries only the JSON lines people pipe into jq; log lines go to stderr.
    configure_logging(cfg.log.level, cfg.log.format)
    state_dir = Path(cfg.storage.state_dir)
    if not state_dir.is_dir():
        # Not "no dead letters": most likely a config other than the daemon's.
        what = "is not a directory" if state_dir.exists() else "does not exist"
        raise ConfigError("storage.state_dir", f"{state_dir} {what}; is this the daemon's "
                                               "config (--config, FORWARDER_STORAGE__STATE_DIR)?")
    if args.dl_command == "list":
        out = sys.stdout.buffer
        for entry in read_entries(state_dir, reason=args.reason):
            out.write(orjson.dumps(entry.record) + b"\n")
        out.flush()
        return 0
    intake = cfg.intake
    if intake.unix_socket:
        result = asyncio.run(replay(state_dir, unix_socket=intake.unix_socket,
                                    reason=args.reason))
    else:
        host = "127.0.0.1" if intake.host in ("0.0.0.0", "::", "") else intake.host
        result = asyncio.run(replay(state_dir, base_url=f"http://{host}:{intake.port}",
                                    reason=args.reason))
    print(orjson.dumps({"accepted": result.accepted, "rejected": len(result.rejected),
                        "failed": result.failed}).decode())
    return 0 if not result.rejected and not result.failed else 1


def _send(args: argparse.Namespace) -> int:
    """POST the event to /events/batch, as a batch of one: POST /events answers 202 with an
    empty body (as Intercom does), while a batch's answer says whether the event was a
    duplicate and which metadata keys were dropped."""
    from .client import build_event

    try:
        metadata = _parse_metadata(args.metadata)
    except ValueError as exc:
        print(f"intercom-forwarder send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    event = build_event(args.event_name, user_id=args.user_id, email=args.email, id=args.id,
                        created_at=args.created_at, metadata=metadata or None)
    try:
        if args.socket or args.url:
            conn, path, target = _daemon_connection(args.url or "", args.socket or "")
        else:
            intake = _load(args.config).intake
            host = "127.0.0.1" if intake.host in ("0.0.0.0", "::", "") else intake.host
            conn, path, target = _daemon_connection(f"http://{host}:{intake.port}",
                                                    intake.unix_socket)
    except ValueError as exc:  # a malformed --url
        print(f"intercom-forwarder send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The stdlib encoder, as forwarder.client's: NaN is refused, big integers pass.
    body = json.dumps([event], separators=(",", ":"), allow_nan=False).encode()
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        status, answer = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        print(f"intercom-forwarder send: cannot reach the daemon at {target}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_NOT_TAKEN
    finally:
        conn.close()
    return _report_sent(status, answer)


def _daemon_connection(url: str, unix_socket: str
                       ) -> tuple[http.client.HTTPConnection, str, str]:
    """A connection to the daemon (not yet opened), the batch route's path, and the target
    as messages name it. The url is parsed as forwarder.client parses it (a path prefix,
    for a proxy in front of the intake, is kept); its ValueError names a malformed one."""
    from .client import UnixHTTPConnection, _Target

    target = _Target.parse(url, unix_socket or None)
    batch_path = target.path + "/batch"  # target.path is the prefix + "/events"
    if target.unix_socket:
        return UnixHTTPConnection(target.unix_socket, SEND_TIMEOUT_S), batch_path, str(target)
    conn = http.client.HTTPConnection(target.host, target.port, timeout=SEND_TIMEOUT_S)
    return conn, batch_path, str(target)


def _report_sent(status: int, answer: bytes) -> int:
    """Print what became of the one event and return send's exit code."""
    text = answer.decode("utf-8", "replace")
    if status == 202:
        try:
            result = orjson.loads(answer)
            rejected, duplicates = result["rejected"], result["duplicates"]
            truncated = result.get("truncated", [])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            print(f"intercom-forwarder send: not a batch answer ({status}), is this the "
                  f"daemon?: {text}", file=sys.stderr)
            return EXIT_NOT_TAKEN
        if rejected:
            errors = {"type": "error.list", "errors": rejected[0]["errors"]}
            print(f"intercom-forwarder send: rejected: {orjson.dumps(errors).decode()}",
                  file=sys.stderr)
            return EXIT_REJECTED
        print(f"{status} duplicate (already sent within the dedup window; not forwarded again)"
              if duplicates else f"{status} accepted")
        for entry in truncated:
            print("intercom-forwarder send: metadata keys dropped (Intercom keeps the first 10): "
                  + ", ".join(entry["dropped_metadata_keys"]), file=sys.stderr)
        return 0
    if 400 <= status < 500 and status not in (408, 429):
        print(f"intercom-forwarder send: rejected ({status}): {text}", file=sys.stderr)
        return EXIT_REJECTED
    # 503 (queue full: the answer's not_taken names the event; shutting down), 5xx, 429.
    print(f"intercom-forwarder send: not taken ({status}), try again later: {text}",
          file=sys.stderr)
    return EXIT_NOT_TAKEN


def _parse_metadata(pairs: list[str]) -> dict[str, object]:
    """K=V pairs; V as JSON when it parses (not NaN/Infinity, which are not JSON), else text."""
    def no_constants(name: str) -> object:
        raise ValueError(name)

    metadata: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata takes KEY=VALUE, got {pair!r}")
        try:
            metadata[key] = json.loads(text, parse_constant=no_constants)
        except ValueError:
            metadata[key] = text
    return metadata


if __name__ == "__main__":
    sys.exit(main())
