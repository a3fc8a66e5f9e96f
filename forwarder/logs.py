"""structlog configuration, and nothing else.

Events are dotted, stable names (`intake.listening`, `upstream.dead_lettered`) with values
in fields; dashboards and tests match on them, so renaming one is a breaking change.
JSON by default; console when stderr is a terminal (format "auto").
"""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _orjson_dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def set_log_level(level: str) -> None:
    """Change the level at runtime (a reload); the renderer and output stay as configured.
    Loggers are not cached (cache_logger_on_first_use=False), so every one follows."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)))


class LogThrottle:
    """Lets one warning through per interval and counts the rest, so a client repeating a
    mistake (or Intercom refusing a token) yields a line a minute, not a line an event."""

    __slots__ = ("_clock", "_interval_s", "_next_at", "_suppressed")

    def __init__(self, clock, interval_s: float):
        self._clock = clock
        self._interval_s = interval_s
        self._next_at = float("-inf")
        self._suppressed = 0

    def _due(self) -> int | None:
        now = self._clock.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            return None
        self._next_at = now + self._interval_s
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed

    def warning(self, logger, event: str, **fields) -> None:
        suppressed = self._due()
        if suppressed is not None:
            logger.warning(event, suppressed=suppressed, **fields)

    def error(self, logger, event: str, **fields) -> None:
        suppressed = self._due()
        if suppressed is not None:
            logger.error(event, suppressed=suppressed, **fields)
