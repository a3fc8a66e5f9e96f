"""`intercom-forwarder`: turns argv into a Config, then runs the service or a sub-command.

Only what people change at a shell is a flag; everything else lives in the config file
and FORWARDER_<SECTION>__<KEY> variables (see docs/configuration.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import orjson

from . import __version__
from .config import Config, ConfigError, load_config, render_effective

EXIT_CONFIG = 2


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
                          listen_sockets=listen_fds(os.environ))
        return await service.run()

    try:
        return asyncio.run(_main())
    except OSError as exc:  # e.g. the port is taken
        print(f"intercom-forwarder: cannot start: {exc}", file=sys.stderr)
        return 1


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

    cfg = _load(args.config)
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


if __name__ == "__main__":
    sys.exit(main())
