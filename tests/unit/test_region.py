"""[intercom] region: a shortcut for Intercom's three documented API hosts; base_url, when
set, still wins. The hosts are checked against the `servers` of Intercom's own OpenAPI
description (../shared/intercom-openapi-2.14.yaml), not against a list we typed twice."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest

from forwarder.config import REGION_BASE_URLS, load_config
from forwarder.service import Service
from tests.conftest import base_config

OPENAPI = Path(__file__).resolve().parents[2].parent / "shared" / "intercom-openapi-2.14.yaml"


def documented_servers() -> dict[str, str]:
    """description -> url, from the top-level `servers:` list of Intercom's OpenAPI file."""
    assert OPENAPI.exists(), f"Intercom's OpenAPI description is missing: {OPENAPI}"
    block = re.search(r"^servers:\n((?:[- ] .*\n)+)", OPENAPI.read_text(), re.MULTILINE)
    assert block is not None, "no top-level servers: list in the OpenAPI file"
    pairs = re.findall(r"- url: (\S+)\n\s+description: (.+)", block.group(1))
    return {description: url for url, description in pairs}


def test_the_three_regions_are_exactly_the_documented_api_hosts():
    assert documented_servers() == {
        "The production API server": REGION_BASE_URLS["us"],
        "The european API server": REGION_BASE_URLS["eu"],
        "The australian API server": REGION_BASE_URLS["au"],
    }


@pytest.mark.parametrize("region", ["eu", "au"])
def test_a_region_in_the_toml_file_picks_its_host(tmp_path, region):
    path = tmp_path / "forwarder.toml"
    path.write_text(f"[intercom]\nregion = '{region}'\n")
    assert load_config(str(path), {}).intercom.effective_base_url == \
        f"https://api.{region}.intercom.io"


@pytest.mark.parametrize("toml, env", [
    pytest.param("[intercom]\nregion = 'eu'\nbase_url = 'http://127.0.0.1:4010'\n", {},
                 id="both-in-the-file"),
    pytest.param("[intercom]\nregion = 'au'\n",
                 {"FORWARDER_INTERCOM__BASE_URL": "http://127.0.0.1:4010"},
                 id="base_url-from-the-environment"),
    pytest.param("[intercom]\nbase_url = 'http://127.0.0.1:4010'\n",
                 {"FORWARDER_INTERCOM__REGION": "eu"}, id="region-from-the-environment"),
])  # fmt: skip
def test_base_url_wins_over_the_region(tmp_path, toml, env):
    path = tmp_path / "forwarder.toml"
    path.write_text(toml)
    assert load_config(str(path), env).intercom.effective_base_url == "http://127.0.0.1:4010"


async def test_the_daemon_reports_the_regions_host_as_its_upstream(tmp_path, captured_logs):
    """The service is started and stopped without an event, so nothing is sent anywhere."""
    cfg = base_config(tmp_path, "")
    cfg = dataclasses.replace(cfg, intercom=dataclasses.replace(cfg.intercom, region="au"))
    async with Service(cfg, rng=random.Random(1)):
        pass
    [started] = [e for e in captured_logs if e["event"] == "service.started"]
    assert started["upstream"] == "https://api.au.intercom.io"
