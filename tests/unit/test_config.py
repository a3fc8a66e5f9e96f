"""forwarder.config: the TOML file, FORWARDER_* overrides, the token sources, validation, and
the check-config rendering. Every test passes its own env dict; nothing reads os.environ."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
import traceback
from pathlib import Path

import pytest

from forwarder.cli import build_parser
from forwarder.config import (
    Config,
    ConfigError,
    IntakeConfig,
    LogConfig,
    QueueConfig,
    RateLimitConfig,
    Secret,
    load_config,
    render_effective,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FILE = ROOT / "config" / "forwarder.toml"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
TOKEN = "dG9rOnNlY3JldC10b2tlbi0xMjM0NQ=="  # recognisable, never to be seen in any output


def keys() -> list[tuple[str, str]]:
    """Every (section, key) of the public dataclasses, in order; access_token_source is no key."""
    return [
        (section.name, f.name)
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory())
        if f.name != "access_token_source"
    ]


def env_name(section: str, key: str) -> str:
    return f"FORWARDER_{section.upper()}__{key.upper()}"


def write(tmp_path: Path, text: str, name: str = "forwarder.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error(path: str | None = None, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env or {})
    return caught.value


# --- file loading -------------------------------------------------------------------------


def test_no_file_and_an_empty_environment_give_the_defaults():
    assert load_config(None, {}) == Config()


def test_file_values_replace_the_defaults_of_their_keys_only(tmp_path):
    path = write(
        tmp_path,
        '[intake]\nport = 9000\nhost = "0.0.0.0"\n[rate_limit]\nper_seconds = 2.5\n'
        '[log]\nformat = "json"\n',
    )
    config = load_config(path, {})
    assert config.intake == IntakeConfig(host="0.0.0.0", port=9000)
    assert config.rate_limit == RateLimitConfig(per_seconds=2.5)
    assert config.log == LogConfig(format="json")
    assert config.queue == QueueConfig()


def test_a_float_key_accepts_a_toml_integer(tmp_path):
    config = load_config(write(tmp_path, "[shutdown]\ndrain_seconds = 5\n"), {})
    assert config.shutdown.drain_seconds == 5.0
    assert type(config.shutdown.drain_seconds) is float


def test_a_missing_config_file_is_an_error_naming_the_path(tmp_path):
    path = str(tmp_path / "absent.toml")
    err = error(path)
    assert err.key == path
    assert "cannot read config file" in str(err)


def test_invalid_toml_is_an_error_naming_the_path(tmp_path):
    path = write(tmp_path, "[intake\nport = 1\n")
    err = error(path)
    assert err.key == path
    assert "invalid TOML" in str(err)


def test_a_misspelt_key_in_the_file_is_an_error_naming_it(tmp_path):
    err = error(write(tmp_path, "[queue]\nmax_evnts = 10\n"))
    assert err.key == "queue.max_evnts"
    assert str(err).startswith("queue.max_evnts: unknown key")
    assert "did you mean queue.max_events?" in str(err)


def test_an_unknown_section_in_the_file_is_an_error_naming_it(tmp_path):
    err = error(write(tmp_path, "[queu]\nmax_events = 10\n"))
    assert err.key == "queu"
    assert "unknown section" in str(err)
    assert "did you mean queue?" in str(err)


def test_a_key_outside_any_section_is_an_error_naming_it(tmp_path):
    err = error(write(tmp_path, "port = 9000\n"))
    assert err.key == "port"
    assert "unknown section" in str(err)


def test_a_subtable_inside_a_section_is_an_unknown_key(tmp_path):
    err = error(write(tmp_path, "[intake.tls]\ncert = 'x'\n"))
    assert err.key == "intake.tls"
    assert "unknown key" in str(err)


def test_a_section_given_as_a_value_is_an_error(tmp_path):
    err = error(write(tmp_path, "queue = 5\n"))
    assert err.key == "queue"
    assert "expected a table" in str(err)


@pytest.mark.parametrize(
    ("section", "key", "toml_value", "expected"),
    [
        pytest.param("intake", "port", '"9000"', "expected an integer", id="string-for-int"),
        pytest.param("intake", "port", "true", "expected an integer", id="bool-is-not-int"),
        pytest.param("intake", "port", "9000.0", "expected an integer", id="float-for-int"),
        pytest.param("rate_limit", "per_seconds", '"10"', "expected a number", id="str-for-float"),
        pytest.param(
            "rate_limit", "per_seconds", "false", "expected a number", id="bool-for-float"
        ),
        pytest.param("dedup", "window_seconds", "inf", "finite number", id="inf-for-float"),
        pytest.param("dedup", "window_seconds", "nan", "finite number", id="nan-for-float"),
        pytest.param("intake", "host", "127", "expected a string", id="int-for-str"),
        pytest.param("log", "level", '["info"]', "expected a string", id="array-for-str"),
        pytest.param("storage", "state_dir", "2024-01-01", "expected a string", id="date-for-str"),
    ],
)
def test_a_wrong_type_in_the_file_names_the_key_and_the_expected_type(
    tmp_path, section, key, toml_value, expected
):
    err = error(write(tmp_path, f"[{section}]\n{key} = {toml_value}\n"))
    assert err.key == f"{section}.{key}"
    assert expected in str(err)


# --- environment overrides ----------------------------------------------------------------


def test_environment_overrides_parse_int_float_and_str_keys():
    config = load_config(
        None,
        {
            "FORWARDER_INTAKE__PORT": "9000",
            "FORWARDER_RATE_LIMIT__PER_SECONDS": "2.5",
            "FORWARDER_LOG__FORMAT": "console",
        },
    )
    assert config.intake.port == 9000
    assert config.rate_limit.per_seconds == 2.5
    assert config.log.format == "console"


def test_a_float_key_from_the_environment_accepts_an_integer():
    config = load_config(None, {"FORWARDER_SHUTDOWN__DRAIN_SECONDS": "3"})
    assert config.shutdown.drain_seconds == 3.0
    assert type(config.shutdown.drain_seconds) is float


def test_the_environment_is_applied_after_the_file(tmp_path):
    path = write(tmp_path, "[intake]\nport = 9000\nmax_body_bytes = 2048\n")
    config = load_config(path, {"FORWARDER_INTAKE__PORT": "9100"})
    assert config.intake.port == 9100
    assert config.intake.max_body_bytes == 2048


def test_every_key_has_an_environment_override():
    """For every key, set its variable to the rendered default: the variable must be accepted
    and give back the default (a missing mapping would be an unknown-variable error)."""
    defaults = tomllib.loads(render_effective(Config()))
    env = {}
    for section, key in keys():
        value = defaults[section][key]
        env[env_name(section, key)] = value if isinstance(value, str) else repr(value)
    assert load_config(None, env) == Config()


@pytest.mark.parametrize(
    ("var", "raw", "expected"),
    [
        pytest.param("FORWARDER_INTAKE__PORT", "abc", "expected an integer, got 'abc'", id="int"),
        pytest.param("FORWARDER_INTAKE__PORT", "9000.5", "expected an integer", id="int-not-float"),
        pytest.param("FORWARDER_INTAKE__PORT", "", "expected an integer, got ''", id="int-empty"),
        pytest.param(
            "FORWARDER_RETRY__BASE_DELAY_SECONDS", "soon", "expected a number", id="float"
        ),
        pytest.param("FORWARDER_DEDUP__WINDOW_SECONDS", "inf", "finite number", id="float-inf"),
    ],
)
def test_a_bad_environment_value_names_the_key_and_the_variable(var, raw, expected):
    err = error(None, {var: raw})
    section, key = var.removeprefix("FORWARDER_").lower().split("__")
    assert err.key == f"{section}.{key}"
    assert expected in str(err)
    assert f"(from {var})" in str(err)


def test_an_unknown_forwarder_variable_is_an_error_naming_it():
    err = error(None, {"FORWARDER_QUEUE__MAXEVENTS": "10"})
    assert err.key == "FORWARDER_QUEUE__MAXEVENTS"
    assert "unknown environment variable" in str(err)
    assert "did you mean FORWARDER_QUEUE__MAX_EVENTS?" in str(err)


def test_the_token_source_field_is_not_settable_from_the_environment():
    err = error(None, {"FORWARDER_INTERCOM__ACCESS_TOKEN_SOURCE": "file"})
    assert err.key == "FORWARDER_INTERCOM__ACCESS_TOKEN_SOURCE"


def test_forwarder_config_is_left_to_the_cli_and_not_taken_for_a_key(tmp_path):
    path = write(tmp_path, "[intake]\nport = 9000\n")
    assert load_config(None, {"FORWARDER_CONFIG": path}) == Config()


def test_variables_without_the_forwarder_prefix_are_ignored():
    env = {"PATH": "/usr/bin", "FORWARDERX": "1", "forwarder_intake__port": "x", "HOME": "/"}
    assert load_config(None, env) == Config()


# --- the token ----------------------------------------------------------------------------


def test_no_token_anywhere_is_allowed():
    config = load_config(None, {})
    assert not config.intercom.access_token
    assert config.intercom.access_token_source == ""


def test_the_token_can_come_from_the_config_file(tmp_path):
    path = write(tmp_path, f'[intercom]\naccess_token = "{TOKEN}"\n')
    intercom = load_config(path, {}).intercom
    assert intercom.access_token.reveal() == TOKEN
    assert intercom.access_token_source == f"config file {path}"


def test_the_token_can_come_from_its_forwarder_variable():
    intercom = load_config(None, {"FORWARDER_INTERCOM__ACCESS_TOKEN": TOKEN}).intercom
    assert intercom.access_token == Secret(TOKEN)
    assert intercom.access_token_source == "FORWARDER_INTERCOM__ACCESS_TOKEN"


def test_the_token_file_is_read_and_stripped_of_its_newline(tmp_path):
    token_file = write(tmp_path, f"  {TOKEN}\n\n", name="token")
    env = {"FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": token_file}
    intercom = load_config(None, env).intercom
    assert intercom.access_token.reveal() == TOKEN
    assert intercom.access_token_source == f"access_token_file {token_file}"


def test_the_systemd_credential_is_read_when_no_token_file_is_set(tmp_path):
    (tmp_path / "intercom-access-token").write_text(TOKEN + "\n")
    intercom = load_config(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).intercom
    assert intercom.access_token.reveal() == TOKEN
    assert "systemd credential" in intercom.access_token_source


def test_the_token_can_come_from_intercom_access_token():
    intercom = load_config(None, {"INTERCOM_ACCESS_TOKEN": TOKEN}).intercom
    assert intercom.access_token.reveal() == TOKEN
    assert intercom.access_token_source == "INTERCOM_ACCESS_TOKEN"


@pytest.fixture
def every_source(tmp_path) -> dict[str, str]:
    """An env where each token source holds a different token, named after the source."""
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "intercom-access-token").write_text("from-credential")
    return {
        "FORWARDER_INTERCOM__ACCESS_TOKEN": "from-access-token",
        "FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": write(tmp_path, "from-token-file", "token"),
        "CREDENTIALS_DIRECTORY": str(tmp_path / "creds"),
        "INTERCOM_ACCESS_TOKEN": "from-intercom-env",
    }


@pytest.mark.parametrize(
    ("removed", "expected"),
    [
        pytest.param([], "from-access-token", id="access_token-first"),
        pytest.param(["FORWARDER_INTERCOM__ACCESS_TOKEN"], "from-token-file", id="then-token-file"),
        pytest.param(
            ["FORWARDER_INTERCOM__ACCESS_TOKEN", "FORWARDER_INTERCOM__ACCESS_TOKEN_FILE"],
            "from-credential",
            id="then-credentials-directory",
        ),
        pytest.param(
            [
                "FORWARDER_INTERCOM__ACCESS_TOKEN",
                "FORWARDER_INTERCOM__ACCESS_TOKEN_FILE",
                "CREDENTIALS_DIRECTORY",
            ],
            "from-intercom-env",
            id="then-INTERCOM_ACCESS_TOKEN",
        ),
    ],
)
def test_token_sources_are_taken_in_precedence_order(every_source, removed, expected):
    env = {k: v for k, v in every_source.items() if k not in removed}
    assert load_config(None, env).intercom.access_token.reveal() == expected


def test_a_credentials_directory_without_our_credential_falls_through(tmp_path):
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "INTERCOM_ACCESS_TOKEN": TOKEN}
    assert load_config(None, env).intercom.access_token.reveal() == TOKEN


def test_a_missing_token_file_is_an_error_naming_access_token_file(tmp_path):
    missing = str(tmp_path / "no-such-token")
    err = error(None, {"FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": missing})
    assert err.key == "intercom.access_token_file"
    assert missing in str(err)


def test_an_unreadable_token_file_is_an_error_naming_access_token_file(tmp_path):
    err = error(None, {"FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": str(tmp_path)})  # a directory
    assert err.key == "intercom.access_token_file"
    assert "cannot read" in str(err)


def test_an_empty_token_file_is_an_error_not_a_missing_token(tmp_path):
    token_file = write(tmp_path, "\n", name="token")
    err = error(None, {"FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": token_file})
    assert err.key == "intercom.access_token_file"
    assert "empty" in str(err)


def test_the_redacted_placeholder_pasted_from_check_config_is_rejected(tmp_path):
    err = error(write(tmp_path, '[intercom]\naccess_token = "<redacted>"\n'))
    assert err.key == "intercom.access_token"
    assert "placeholder" in str(err)


# --- the token never shows ----------------------------------------------------------------


def test_the_token_is_not_in_the_repr_of_the_config():
    config = load_config(None, {"INTERCOM_ACCESS_TOKEN": TOKEN})
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config.intercom)
    assert TOKEN not in repr(config.intercom.access_token)


def test_the_token_is_redacted_in_the_rendered_config_and_its_source_named():
    text = render_effective(load_config(None, {"INTERCOM_ACCESS_TOKEN": TOKEN}))
    assert TOKEN not in text
    assert tomllib.loads(text)["intercom"]["access_token"] == "<redacted>"
    assert "# access token: from INTERCOM_ACCESS_TOKEN" in text


def test_an_unset_token_renders_as_empty_and_says_so():
    text = render_effective(load_config(None, {}))
    assert tomllib.loads(text)["intercom"]["access_token"] == ""
    assert "# access token: not set" in text


def _with_token_in_the_file(tmp_path, rest: str) -> str:
    return write(tmp_path, f'[intercom]\naccess_token = "{TOKEN}"\n{rest}')


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda tmp: error(_with_token_in_the_file(tmp, "workspace_id = ''\n")),
            id="another-key-invalid",
        ),
        pytest.param(
            lambda tmp: error(_with_token_in_the_file(tmp, "access_tokn = 'x'\n")),
            id="unknown-key-beside-it",
        ),
        pytest.param(
            lambda tmp: error(write(tmp, f'[intercom]\naccess_token = "{TOKEN}" junk\n')),
            id="invalid-toml-on-its-line",
        ),
        pytest.param(
            lambda tmp: error(write(tmp, f"[intercom]\naccess_token = {TOKEN[:8]}\n")),
            id="unquoted-token",
        ),
        pytest.param(
            lambda tmp: error(write(tmp, "[intercom]\naccess_token = 8675309\n")),
            id="token-of-the-wrong-type",
        ),
        pytest.param(
            lambda tmp: error(None, {"INTERCOM_ACCESS_TOKEN": f"{TOKEN} {TOKEN}"}),
            id="token-with-a-space",
        ),
    ],
)
def test_the_token_is_in_no_error_message(tmp_path, make):
    err = make(tmp_path)
    shown = "".join(traceback.format_exception(err))
    for secret in (TOKEN, TOKEN[:8], "8675309"):
        assert secret not in shown


# --- ranges -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        pytest.param("[intake]\nport = -1", "intake.port", "between 0 and 65535", id="port-min"),
        pytest.param("[intake]\nport = 65536", "intake.port", "between 0 and 65535", id="port-max"),
        pytest.param("[intake]\nmax_body_bytes = 0", "intake.max_body_bytes", "at least 1",
                     id="max_body_bytes-positive"),
        pytest.param("[intercom]\nbase_url = 'api.intercom.io'", "intercom.base_url",
                     "http:// or https://", id="base_url-scheme"),
        pytest.param("[intercom]\nregion = 'eu-west'", "intercom.region", "us / eu / au",
                     id="region-known"),
        pytest.param("[intercom]\napi_version = ''", "intercom.api_version", "not be empty",
                     id="api_version-not-empty"),
        pytest.param("[intercom]\nworkspace_id = ''", "intercom.workspace_id", "not be empty",
                     id="workspace_id-not-empty"),
        pytest.param("[intercom]\nworkspace_id = '  '", "intercom.workspace_id", "not be empty",
                     id="workspace_id-not-blank"),
        pytest.param("[intercom]\ntimeout_seconds = 0", "intercom.timeout_seconds",
                     "greater than 0", id="timeout_seconds-positive"),
        pytest.param("[rate_limit]\nrequests = 0", "rate_limit.requests", "at least 1",
                     id="requests-positive"),
        pytest.param("[rate_limit]\nper_seconds = 0", "rate_limit.per_seconds", "greater than 0",
                     id="per_seconds-positive"),
        pytest.param("[queue]\nmax_events = 0", "queue.max_events", "at least 1",
                     id="max_events-positive"),
        pytest.param('[queue]\ntype = "sqlite"', "queue.type", "one of memory / disk",
                     id="queue-type-choices"),
        pytest.param('[queue]\ndisk_sync = "off"', "queue.disk_sync", "one of normal / full",
                     id="disk_sync-choices"),
        pytest.param("[queue]\nmax_disk_bytes = 1000", "queue.max_disk_bytes",
                     "at least 1048576", id="max_disk_bytes-floor"),
        pytest.param("[dedup]\nwindow_seconds = 0", "dedup.window_seconds", "greater than 0",
                     id="window_seconds-positive"),
        pytest.param("[dedup]\nmax_keys = 0", "dedup.max_keys", "at least 1",
                     id="max_keys-positive"),
        pytest.param("[retry]\nmax_attempts = 0", "retry.max_attempts", "at least 1",
                     id="max_attempts-positive"),
        pytest.param("[retry]\nbase_delay_seconds = 0", "retry.base_delay_seconds",
                     "greater than 0", id="base_delay_seconds-positive"),
        pytest.param("[retry]\nbase_delay_seconds = 2\nmax_delay_seconds = 1",
                     "retry.max_delay_seconds", "at least retry.base_delay_seconds",
                     id="max_delay-not-below-base_delay"),
        pytest.param("[workers]\nconcurrency = 0", "workers.concurrency", "at least 1",
                     id="concurrency-positive"),
        pytest.param("[storage]\nstate_dir = ''", "storage.state_dir", "not be empty",
                     id="state_dir-not-empty"),
        pytest.param("[storage]\ndead_letter_max_bytes = 0", "storage.dead_letter_max_bytes",
                     "at least 1", id="dead_letter_max_bytes-positive"),
        pytest.param("[storage]\ndead_letter_keep_files = 0", "storage.dead_letter_keep_files",
                     "at least 1", id="dead_letter_keep_files-positive"),
        pytest.param("[shutdown]\ndrain_seconds = -0.5", "shutdown.drain_seconds", "at least 0",
                     id="drain_seconds-not-negative"),
        pytest.param("[log]\nlevel = 'verbose'", "log.level", "debug / info / warning / error",
                     id="level-known"),
        pytest.param("[log]\nlevel = 'INFO'", "log.level", "debug / info / warning / error",
                     id="level-lowercase"),
        pytest.param("[log]\nformat = 'text'", "log.format", "json / console / auto",
                     id="format-known"),
        pytest.param("[log]\nstats_interval_seconds = 0", "log.stats_interval_seconds",
                     "greater than 0", id="stats_interval_seconds-positive"),
    ],
)  # fmt: skip
def test_a_value_out_of_range_names_the_key_and_the_rule(tmp_path, toml, key, expected):
    err = error(write(tmp_path, toml + "\n"))
    assert err.key == key
    assert expected in str(err)


def test_a_range_error_from_the_environment_names_the_variable():
    err = error(None, {"FORWARDER_INTAKE__PORT": "70000"})
    assert str(err) == (
        "intake.port: must be between 0 and 65535 (0: any free port), got 70000"
        " (from FORWARDER_INTAKE__PORT)"
    )


@pytest.mark.parametrize(
    ("toml", "check"),
    [
        pytest.param("[intake]\nport = 0", lambda c: c.intake.port == 0, id="port-0-any-free"),
        pytest.param("[intake]\nport = 65535", lambda c: c.intake.port == 65535, id="port-65535"),
        pytest.param("[shutdown]\ndrain_seconds = 0", lambda c: c.shutdown.drain_seconds == 0,
                     id="drain-0-spools-at-once"),
        pytest.param("[retry]\nbase_delay_seconds = 3\nmax_delay_seconds = 3",
                     lambda c: c.retry.max_delay_seconds == 3.0, id="max_delay-equal-base"),
        pytest.param("[intercom]\nbase_url = 'http://127.0.0.1:4010/'",
                     lambda c: c.intercom.effective_base_url == "http://127.0.0.1:4010",
                     id="http-base_url-for-the-fake"),
    ],
)  # fmt: skip
def test_values_on_the_edge_of_a_range_are_accepted(tmp_path, toml, check):
    assert check(load_config(write(tmp_path, toml + "\n"), {}))


@pytest.mark.parametrize(
    ("region", "url"),
    [("us", "https://api.intercom.io"), ("eu", "https://api.eu.intercom.io"),
     ("au", "https://api.au.intercom.io")],
)  # fmt: skip
def test_the_region_picks_the_base_url_when_none_is_set(region, url):
    config = load_config(None, {"FORWARDER_INTERCOM__REGION": region})
    assert config.intercom.effective_base_url == url


# --- render_effective ---------------------------------------------------------------------


def test_the_rendering_has_every_section_in_order_and_every_key():
    rendered = tomllib.loads(render_effective(Config()))
    assert [(s, k) for s, table in rendered.items() for k in table] == keys()


def test_the_rendering_of_a_config_without_a_token_loads_back_equal(tmp_path):
    """Steps: load a config that changes every section, including strings that need TOML
    escapes; render it; load the rendering. Expected: an equal Config."""
    source = write(
        tmp_path,
        "[intake]\nhost = '::1'\nport = 0\nunix_socket = '/run/fw \"q\"\\\\x.sock'\n"
        "max_body_bytes = 2048\n"
        "[intercom]\nregion = 'eu'\nbase_url = 'http://127.0.0.1:1'\napi_version = 'Unstable'\n"
        "workspace_id = 'wsp-ü-✓'\ntimeout_seconds = 0.25\n"
        "[rate_limit]\nrequests = 7\nper_seconds = 1e-3\n[queue]\nmax_events = 3\n"
        "[dedup]\nwindow_seconds = 1.5\nmax_keys = 9\n"
        "[retry]\nmax_attempts = 1\nbase_delay_seconds = 0.1\nmax_delay_seconds = 1e6\n"
        "[workers]\nconcurrency = 2\n"
        '[storage]\nstate_dir = "C:\\\\state\\ttab"\ndead_letter_max_bytes = 1\n'
        "dead_letter_keep_files = 2\n"
        "[shutdown]\ndrain_seconds = 0\n[log]\nlevel = 'debug'\nformat = 'json'\n"
        "stats_interval_seconds = 5\n",
        name="source.toml",
    )
    original = load_config(source, {})
    assert original != Config()
    rendered = write(tmp_path, render_effective(original), name="rendered.toml")
    assert load_config(rendered, {}) == original


def test_the_rendering_of_the_defaults_loads_back_equal(tmp_path):
    rendered = write(tmp_path, render_effective(Config()))
    assert load_config(rendered, {}) == Config()


def test_the_rendering_escapes_control_characters_into_valid_toml(tmp_path):
    config = load_config(None, {"FORWARDER_INTAKE__HOST": 'a\x00b\x7f"\\\nc'})
    rendered = tomllib.loads(render_effective(config))
    assert rendered["intake"]["host"] == 'a\x00b\x7f"\\\nc'


def test_the_rendering_names_a_token_file_as_the_source_without_the_token(tmp_path):
    token_file = write(tmp_path, TOKEN, name="token")
    config = load_config(None, {"FORWARDER_INTERCOM__ACCESS_TOKEN_FILE": token_file})
    text = render_effective(config)
    assert f"# access token: from access_token_file {token_file}" in text
    assert TOKEN not in text


# --- the shipped default file and the reference doc ---------------------------------------


def test_the_shipped_default_file_loads_to_exactly_the_defaults():
    assert load_config(str(DEFAULT_FILE), {}) == Config()


def test_the_shipped_default_file_sets_every_key_and_names_its_variable():
    text = DEFAULT_FILE.read_text(encoding="utf-8")
    parsed = tomllib.loads(text)
    assert [(s, k) for s, table in parsed.items() for k in table] == keys()
    missing = [env_name(s, k) for s, k in keys() if env_name(s, k) not in text]
    assert missing == []


def test_the_configuration_doc_lists_every_key_and_variable():
    text = CONFIG_DOC.read_text(encoding="utf-8")
    missing = [
        name
        for section, key in keys()
        for name in (f"`{section}.{key}`", f"`{env_name(section, key)}`")
        if name not in text
    ]
    assert missing == []


# --- the default file's own instructions ----------------------------------------------------


def test_every_command_the_default_file_tells_you_to_run_is_one_the_cli_accepts():
    """Its header once said `intercom-forwarder --config PATH`, which the CLI refuses."""
    commands = re.findall(r"`intercom-forwarder ([^`]*)`", DEFAULT_FILE.read_text())
    for command in commands:
        try:
            build_parser().parse_args(shlex.split(command))
        except SystemExit:
            pytest.fail(f"config/forwarder.toml shows a command the CLI refuses: {command}")
    assert {c.split()[0] for c in commands} == {"serve", "check-config"}


def test_disk_mode_keys_default_to_memory_and_read_from_the_environment(tmp_path):
    """issue 13: memory mode unless asked; FORWARDER_QUEUE__TYPE etc. select disk mode."""
    assert load_config(None, {}).queue == QueueConfig(type="memory", disk_sync="normal",
                                                     max_disk_bytes=1 << 30)
    env = {"FORWARDER_QUEUE__TYPE": "disk", "FORWARDER_QUEUE__DISK_SYNC": "full",
           "FORWARDER_QUEUE__MAX_DISK_BYTES": "2097152"}
    queue = load_config(None, env).queue
    assert (queue.type, queue.disk_sync, queue.max_disk_bytes) == ("disk", "full", 2097152)
    rendered = render_effective(load_config(None, env))
    assert 'type = "disk"' in rendered and 'disk_sync = "full"' in rendered


def test_fleet_redis_url_takes_the_three_schemes_and_never_shows_a_password():
    for url in ("redis://h:6379/0", "rediss://h:6380/1", "unix:///run/redis/redis.sock"):
        cfg = load_config(env={"FORWARDER_FLEET__REDIS_URL": url})
        assert cfg.fleet.redis_url.reveal() == url
        assert url not in repr(cfg)
    err = str(error(env={"FORWARDER_FLEET__REDIS_URL": "http://user:hunter2@h:6379"}))
    assert "fleet.redis_url" in err and "redis://" in err and "hunter2" not in err
    cfg = load_config(env={"FORWARDER_FLEET__REDIS_URL": "redis://u:hunter2@redis:6379/0"})
    text = render_effective(cfg)
    assert "hunter2" not in text
    assert tomllib.loads(text)["fleet"]["redis_url"] == "redis://u:<redacted>@redis:6379/0"
    cfg = load_config(env={"FORWARDER_FLEET__REDIS_URL": "unix:///s.sock?db=1&password=hunter2"})
    assert tomllib.loads(render_effective(cfg))["fleet"]["redis_url"] == \
        "unix:///s.sock?db=1&password=<redacted>"
    assert load_config(env={}).fleet.redis_url.reveal() == ""
