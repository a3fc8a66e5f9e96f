"""`intercom-forwarder`: turns argv into a Config, then runs the service or a sub-command.

Only what people change at a shell is a flag; everything else lives in the config file
and FORWARDER_<SECTION>__<KEY> variables (see docs/configuration.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from pathlib import Path

import orjson

from . import __version__
from .config import Config, ConfigError, load_config, render_effective

EXIT_CONFIG = 2
EXIT_USAGE = 2  # as argparse's own usage errors
EXIT_REJECTED = 1  # send: the daemon answered 4xx; sending the same event again cannot help
EXIT_NOT_TAKEN = 3  # send: unreachable, or 503/5xx; the same event may be sent again later
SEND_TIMEOUT_S = 5.0


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

    p = sub.add_parser("check-config", help="validate a config and print the effective one "
                                            "(token redacted)")
    _config_arg(p)

    p = sub.add_parser("dead-letters", help="list or replay dead-lettered events")
    dl = p.add_subparsers(dest="dl_command", required=True, metavar="ACTION")
    for name, help_text in (("list", "print dead-lettered events, one JSON object a line"),
                            ("replay", ("re-submit them through a running daemon's intake; "
                                        "accepted ones are removed from the file"))):
        q = dl.add_parser(name, help=help_text)
        _config_arg(q)
        q.add_argument("--reason", help="only entries with this reason "
                                        "(contact_not_found, rejected, retries_exhausted)")

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
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            from .demo import main as demo_main
            return demo_main()
        if args.command == "check-config":
            cfg = _load(args.config)
            sys.stdout.write(render_effective(cfg))
            return 0
        if args.command == "dead-letters":
            return _dead_letters(args)
        if args.command == "send":
            return _send(args)
    except ConfigError as exc:
        print(f"intercom-forwarder: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return 2


def _serve(args: argparse.Namespace) -> int:
    from .logs import configure_logging
    from .notify import SystemdNotifier, listen_fds
    from .service import Service

    cfg = _load(args.config)
    configure_logging(cfg.log.level, cfg.log.format)
    _install_loop(args.loop)

    async def _main() -> int:
        service = Service(cfg, notifier=SystemdNotifier.from_env(os.environ),
                          listen_sockets=listen_fds(os.environ),
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
    from .client import EventClient, build_event

    try:
        metadata = _parse_metadata(args.metadata)
    except ValueError as exc:
        print(f"intercom-forwarder send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    event = build_event(args.event_name, user_id=args.user_id, email=args.email, id=args.id,
                        created_at=args.created_at, metadata=metadata or None)
    try:
        if args.socket:
            client = EventClient(unix_socket=args.socket, timeout_s=SEND_TIMEOUT_S)
        elif args.url:
            client = EventClient(args.url, timeout_s=SEND_TIMEOUT_S)
        else:
            intake = _load(args.config).intake
            host = "127.0.0.1" if intake.host in ("0.0.0.0", "::", "") else intake.host
            client = EventClient(f"http://{host}:{intake.port}",
                                 unix_socket=intake.unix_socket or None,
                                 timeout_s=SEND_TIMEOUT_S)
    except ValueError as exc:  # a malformed --url
        print(f"intercom-forwarder send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with client:
        reply = client.post_event(event)
    answer = reply.body.decode("utf-8", "replace")
    if reply.accepted:
        print(f"{reply.status} accepted")
        return 0
    if reply.outcome == "rejected":
        print(f"intercom-forwarder send: rejected ({reply.status}): {answer or reply.error}",
              file=sys.stderr)
        return EXIT_REJECTED
    if reply.status:
        print(f"intercom-forwarder send: not taken ({reply.status}), try again later: "
              f"{answer}", file=sys.stderr)
    else:
        print(f"intercom-forwarder send: cannot reach the daemon at {client.target}: "
              f"{reply.error}", file=sys.stderr)
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
