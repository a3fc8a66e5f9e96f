"""Configuration tree: frozen dataclasses, loaded from TOML, then FORWARDER_<SECTION>__<KEY>
environment overrides, then the token (access_token, access_token_file or
INTERCOM_ACCESS_TOKEN). Every key has one spelling everywhere: TOML `queue.max_events`,
env `FORWARDER_QUEUE__MAX_EVENTS`, field `QueueConfig.max_events`.

Stages never read the environment; service.py hands each its own section.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path


class ConfigError(ValueError):
    """An invalid configuration; the message names the key (e.g. `queue.max_events`)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class Secret:
    """Holds the access token; its repr and str are masked so it never reaches a log."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


REGION_BASE_URLS = {
    "us": "https://api.intercom.io",
    "eu": "https://api.eu.intercom.io",
    "au": "https://api.au.intercom.io",
}


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    host: str = "127.0.0.1"
    port: int = 8377
    unix_socket: str = ""
    max_body_bytes: int = 1_048_576


@dataclass(frozen=True, slots=True)
class IntercomConfig:
    base_url: str = ""  # empty: taken from region
    region: str = "us"
    access_token: Secret = field(default_factory=lambda: Secret(""))
    access_token_file: str = ""
    api_version: str = "2.14"
    workspace_id: str = "default"
    timeout_seconds: float = 10.0
    # Where the token came from (e.g. "INTERCOM_ACCESS_TOKEN"), never its value. Set by
    # load_config for check-config output; not a config key.
    access_token_source: str = ""

    @property
    def effective_base_url(self) -> str:
        return (self.base_url or REGION_BASE_URLS[self.region]).rstrip("/")


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    requests: int = 1666
    per_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_events: int = 100_000  # memory mode's bound; disk mode is bounded by max_disk_bytes
    # "memory": today's queue, spooled at a clean stop only. "disk": every event answered
    # 202 is committed to state_dir/queue.db first, so it survives kill -9 (issue 13).
    type: str = "memory"
    # Disk mode: "normal" survives the process's death, "full" also a power loss (fsync).
    disk_sync: str = "normal"
    max_disk_bytes: int = 1 << 30


@dataclass(frozen=True, slots=True)
class DedupConfig:
    window_seconds: float = 86_400.0
    max_keys: int = 1_000_000


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 10
    base_delay_seconds: float = 0.5
    max_delay_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    concurrency: int = 32


@dataclass(frozen=True, slots=True)
class StorageConfig:
    state_dir: str = "/var/lib/intercom-forwarder"
    dead_letter_max_bytes: int = 64 * 1024 * 1024
    dead_letter_keep_files: int = 5


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    drain_seconds: float = 20.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # "json", "console", or "auto": console on a terminal, else json
    stats_interval_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class FleetConfig:
    # Empty: no Redis, each daemon paces its own share (ratelimit/share.py). Set, every
    # daemon of the app on this Redis shares one budget and one dedup window (docs/fleet.md).
    # A Secret: the URL may hold a password, so it is never echoed (render_effective masks
    # only the password).
    redis_url: Secret = field(default_factory=lambda: Secret(""))


@dataclass(frozen=True, slots=True)
class Config:
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    intercom: IntercomConfig = field(default_factory=IntercomConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


ENV_PREFIX = "FORWARDER_"
TOKEN_ENV = "INTERCOM_ACCESS_TOKEN"
CREDENTIAL_NAME = "intercom-access-token"  # systemd LoadCredential=intercom-access-token:...
REDACTED = "<redacted>"
CONFIG_PATH_ENV = "FORWARDER_CONFIG"  # names the file; cli.py reads it, it is no key
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # what redis-py's from_url takes


_SCHEMA = {  # section -> (dataclass, key -> type), in dataclass order
    section: (
        cls,
        {k: t for k, t in typing.get_type_hints(cls).items() if k != "access_token_source"},
    )
    for section, cls in typing.get_type_hints(Config).items()
}
_ENV_KEYS = {  # FORWARDER_QUEUE__MAX_EVENTS -> ("queue", "max_events")
    f"{ENV_PREFIX}{section.upper()}__{key.upper()}": (section, key)
    for section, (_, keys) in _SCHEMA.items()
    for key in keys
}
_KIND = {int: "an integer", float: "a number", str: "a string", Secret: "a string"}


def _one_of(*choices: str) -> tuple[Callable[[typing.Any], bool], str]:
    return (lambda v: v in choices), f"must be one of {' / '.join(choices)}"


_AT_LEAST_1 = ((lambda v: v >= 1), "must be at least 1")
_ABOVE_ZERO = ((lambda v: v > 0), "must be greater than 0")
_NOT_BLANK = ((lambda v: bool(v.strip())), "must not be empty")
# One rule per key; retry.max_delay_seconds >= base_delay_seconds is checked in _validate.
_RULES: dict[str, tuple[Callable[[typing.Any], bool], str]] = {
    "intake.port": ((lambda v: 0 <= v <= 65535), "must be between 0 and 65535 (0: any free port)"),
    "intake.max_body_bytes": _AT_LEAST_1,
    "intercom.base_url": (
        (lambda v: not v or v.startswith(("http://", "https://"))),
        "must start with http:// or https:// (or be empty: the region's URL)",
    ),
    "intercom.region": _one_of(*REGION_BASE_URLS),
    "intercom.api_version": _NOT_BLANK,
    "intercom.workspace_id": _NOT_BLANK,
    "intercom.timeout_seconds": _ABOVE_ZERO,
    "rate_limit.requests": _AT_LEAST_1,
    "rate_limit.per_seconds": _ABOVE_ZERO,
    "queue.max_events": _AT_LEAST_1,
    "queue.type": _one_of("memory", "disk"),
    "queue.disk_sync": _one_of("normal", "full"),
    # Below a megabyte the log's own pages (schema, dedup index) leave no room for events.
    "queue.max_disk_bytes": ((lambda v: v >= 1 << 20), "must be at least 1048576 (1 MiB)"),
    "dedup.window_seconds": _ABOVE_ZERO,
    "dedup.max_keys": _AT_LEAST_1,
    "retry.max_attempts": _AT_LEAST_1,
    "retry.base_delay_seconds": _ABOVE_ZERO,
    "workers.concurrency": _AT_LEAST_1,
    "storage.state_dir": _NOT_BLANK,
    "storage.dead_letter_max_bytes": _AT_LEAST_1,
    "storage.dead_letter_keep_files": _AT_LEAST_1,
    "shutdown.drain_seconds": ((lambda v: v >= 0), "must be at least 0"),
    "log.level": _one_of("debug", "info", "warning", "error"),
    "log.format": _one_of("json", "console", "auto"),
    "log.stats_interval_seconds": _ABOVE_ZERO,
    # Checked on the scheme alone, and the message never holds the URL (a password).
    "fleet.redis_url": (
        (lambda v: not v or v.reveal().startswith(REDIS_SCHEMES)),
        "must start with " + ", ".join(REDIS_SCHEMES) + " (or be empty: no Redis)",
    ),
}


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """TOML file (optional), then FORWARDER_* env, then the token; validated.

    Raises ConfigError naming the key on any problem; no message ever holds the token.
    """
    env = os.environ if env is None else env
    values: dict[str, dict[str, object]] = {section: {} for section in _SCHEMA}
    origins: dict[str, str] = {}  # key -> where its value came from, for messages
    if path is not None:
        for section, table in _read_toml(path).items():
            if section not in _SCHEMA:
                raise _unknown(section, "section", _SCHEMA)
            if not isinstance(table, dict):
                raise ConfigError(section, f"expected a table [{section}], got {_describe(table)}")
            keys = _SCHEMA[section][1]
            for key, value in table.items():
                name = f"{section}.{key}"
                if key not in keys:
                    raise _unknown(name, "key", [f"{section}.{k}" for k in keys])
                values[section][key] = _convert(name, value, keys[key], None)
                origins[name] = f"config file {path}"
    for var in sorted(v for v in env if v.startswith(ENV_PREFIX) and v != CONFIG_PATH_ENV):
        if var not in _ENV_KEYS:
            raise _unknown(var, "environment variable", _ENV_KEYS)
        section, key = _ENV_KEYS[var]
        name = f"{section}.{key}"
        values[section][key] = _convert(name, env[var], _SCHEMA[section][1][key], var)
        origins[name] = var
    config = Config(**{s: _SCHEMA[s][0](**v) for s, v in values.items()})
    _validate(config, origins)
    token_origin = origins.get("intercom.access_token", "")
    return replace(config, intercom=_resolve_token(config.intercom, env, token_origin))


def _read_toml(path: str) -> dict[str, typing.Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(str(path), f"cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:  # its message gives line and column, never the text
        raise ConfigError(str(path), f"invalid TOML: {e}") from None


def _unknown(name: str, what: str, known: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    return ConfigError(name, f"unknown {what}" + (f" (did you mean {close[0]}?)" if close else ""))


_TOML_KIND = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}


def _describe(value: object, show: bool = False) -> str:
    """A TOML value's type, and the value itself when show (never for the token)."""
    text = _TOML_KIND.get(type(value)) or {dict: "a table", list: "an array"}.get(type(value))
    if show and type(value) in _TOML_KIND:
        return f"{text} ({str(value).lower() if type(value) is bool else repr(value)})"
    return text or "a date or time"


def _convert(name: str, value: object, typ: type, var: str | None) -> object:
    """value as the key's type. From the environment (var set) it is a string to parse."""
    if var is not None and typ in (int, float):
        try:
            value = typ(value)
        except ValueError:
            raise ConfigError(name, f"expected {_KIND[typ]}, got {value!r} (from {var})") from None
    if typ is float and type(value) is int:  # a TOML `10` is fine where 10.0 is meant
        value = float(value)
    if type(value) is not (str if typ is Secret else typ):  # so a boolean is not an integer
        raise ConfigError(name, f"expected {_KIND[typ]}, got {_describe(value, typ is not Secret)}")
    if typ is float and not math.isfinite(value):  # TOML and float() both accept inf and nan
        where = f" (from {var})" if var else ""
        raise ConfigError(name, f"must be a finite number, got {value}{where}")
    return Secret(value) if typ is Secret else value


def _validate(config: Config, origins: Mapping[str, str]) -> None:
    def fail(name: str, rule: str, value: object) -> typing.NoReturn:
        origin = origins.get(name, "")
        where = f" (from {origin})" if origin.startswith(ENV_PREFIX) else ""
        raise ConfigError(name, f"{rule}, got {value!r}{where}")

    for name, (check, rule) in _RULES.items():
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if not check(value):
            fail(name, rule, value)
    retry = config.retry
    if retry.max_delay_seconds < retry.base_delay_seconds:
        rule = f"must be at least retry.base_delay_seconds ({retry.base_delay_seconds})"
        fail("retry.max_delay_seconds", rule, retry.max_delay_seconds)


def _resolve_token(ic: IntercomConfig, env: Mapping[str, str], origin: str) -> IntercomConfig:
    """access_token, else access_token_file, else $CREDENTIALS_DIRECTORY, else the env var."""
    credential = Path(env.get("CREDENTIALS_DIRECTORY") or "/nonexistent") / CREDENTIAL_NAME
    if ic.access_token:
        name, token, source = "intercom.access_token", ic.access_token.reveal(), origin
    elif ic.access_token_file:
        name, source = "intercom.access_token_file", f"access_token_file {ic.access_token_file}"
        token = _read_token_file(Path(ic.access_token_file))
    elif env.get("CREDENTIALS_DIRECTORY") and credential.exists():
        # systemd's LoadCredential= sets CREDENTIALS_DIRECTORY; a unit may load other
        # credentials but not ours, so a missing file here falls through to the variable.
        name, source = "intercom.access_token_file", f"systemd credential {credential}"
        token = _read_token_file(credential)
    elif env.get(TOKEN_ENV):
        name, token, source = TOKEN_ENV, env[TOKEN_ENV], TOKEN_ENV
    else:
        return ic
    if token == REDACTED:
        raise ConfigError(name, f"is the {REDACTED} placeholder from check-config, not a token")
    if not all(33 <= ord(c) <= 126 for c in token):  # it goes into an HTTP header
        raise ConfigError(name, "the token must be printable ASCII without spaces (not shown)")
    return replace(ic, access_token=Secret(token), access_token_source=source)


# How _resolve_token names a token it read (a file, the credential, the variable), as
# opposed to one written into the config itself (intercom.access_token).
_READ_TOKEN_SOURCES = ("access_token_file ", "systemd credential ", TOKEN_ENV)


def reread_token(ic: IntercomConfig, env: Mapping[str, str] | None = None) -> IntercomConfig:
    """`ic` with its token read again from where start-up found it, by start-up's rules:
    access_token_file, else the systemd credential, else INTERCOM_ACCESS_TOKEN. This is how
    a rotated token file reaches a running daemon (a reload, or the auth probe).

    A token written into the config itself (intercom.access_token) is kept as it is: it
    changes with the config file. Raises ConfigError as load_config does (an unreadable
    or empty file), never naming the token.
    """
    if ic.access_token and not ic.access_token_source.startswith(_READ_TOKEN_SOURCES):
        return ic
    env = os.environ if env is None else env
    return _resolve_token(replace(ic, access_token=Secret("")), env, "")


def _read_token_file(path: Path) -> str:
    """The file's text stripped of surrounding whitespace (Docker secrets end in a newline)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not UTF-8 text"
        raise ConfigError("intercom.access_token_file", f"cannot read {path}: {why}") from None
    if not token:
        raise ConfigError("intercom.access_token_file", f"{path} is empty")
    return token


_TOML_ESCAPES = {c: f"\\u{c:04X}" for c in [*range(0x20), 0x7F] if c != 0x09}
_TOML_ESCAPES |= {ord('"'): '\\"', ord("\\"): "\\\\"}


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.translate(_TOML_ESCAPES) + '"'
    return repr(value)  # int, or a finite float: repr gives "10.0" and "1e-05", valid TOML


def render_effective(config: Config) -> str:
    """The effective config as TOML text, with the token redacted (for check-config)."""
    lines = ["# Effective configuration: defaults, then the file, then FORWARDER_* variables."]
    for section, (_, keys) in _SCHEMA.items():
        sub = getattr(config, section)
        lines += ["", f"[{section}]"]
        if isinstance(sub, IntercomConfig):
            came = f"from {sub.access_token_source}" if sub.access_token else "not set"
            lines.append(f"# access token: {came} (the value is never shown)")
            if not sub.base_url:
                lines.append(f"# base_url empty: {sub.region} region, {sub.effective_base_url}")
        for key in keys:
            value = getattr(sub, key)
            if isinstance(value, Secret):
                value = (mask_url_password(value.reveal()) if key == "redis_url"
                         else REDACTED if value else "")
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def mask_url_password(url: str) -> str:
    """The URL with its password (in the userinfo or redis-py's ?password=) replaced by
    <redacted>: the host, port, db or socket path are what an operator checks, the
    password must never be shown. Edited as text: urlunsplit would turn unix:///path
    into unix:/path."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = url.replace(parts.netloc, f"{parts.username or ''}:{REDACTED}@{host}", 1)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        masked = [(k, REDACTED if k == "password" else v) for k, v in query]
        url = url.partition("?")[0] + "?" + urllib.parse.urlencode(masked, safe="<>")
    return url
