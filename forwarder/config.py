"""Configuration tree: frozen dataclasses, loaded from TOML, then FORWARDER_<SECTION>__<KEY>
environment overrides, then the token (access_token, access_token_file or
INTERCOM_ACCESS_TOKEN). Every key has one spelling everywhere: TOML `queue.max_events`,
env `FORWARDER_QUEUE__MAX_EVENTS`, field `QueueConfig.max_events`.

Stages never read the environment; service.py hands each its own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def effective_base_url(self) -> str:
        return (self.base_url or REGION_BASE_URLS[self.region]).rstrip("/")


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    requests: int = 1666
    per_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_events: int = 100_000


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


def load_config(path: str | None = None, env: dict[str, str] | None = None) -> Config:
    """TOML file (optional), then FORWARDER_* env, then the token; validated.

    Raises ConfigError naming the key on any problem.
    """
    raise NotImplementedError  # written by the config helper


def render_effective(config: Config) -> str:
    """The effective config as TOML text, with the token redacted (for check-config)."""
    raise NotImplementedError  # written by the config helper
