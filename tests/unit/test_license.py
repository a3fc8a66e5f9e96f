"""The licence pyproject.toml declares is a file in the tree, in the wheel's build context,
and in the form setuptools takes without a deprecation warning (issue 12 C18)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_declared_licence_is_an_spdx_expression_whose_file_exists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    for name in project["license-files"]:
        assert (ROOT / name).read_text().startswith("MIT License\n")


def test_every_file_the_dockerignore_allowlist_names_exists():
    """.dockerignore and docs/deploy-sidecar.md named a LICENSE that was not there."""
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert "LICENSE" in allowed
    assert [name for name in allowed if not (ROOT / name).exists()] == []
