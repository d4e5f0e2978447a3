"""`ovi-server serve` options: env vars shown in --help, env < flags, auth refusal off loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovi_server.cli import build_parser, build_server_config
from ovi_server.commands import check_auth
from ovi_server.config import ServerConfig


def test_help_names_every_env_var(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for env in ("OVI_API_KEYS", "OVI_PUBLIC_URL", "OVI_DATA_DIR", "OVI_VARIANT", "OVI_TLS_CERT", "OVI_PORT"):
        assert f"[env {env}]" in text


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("OVI_PORT", "9001")
    monkeypatch.setenv("OVI_API_KEYS", "a:1, b:2")
    monkeypatch.setenv("OVI_DATA_DIR", str(tmp_path))
    config = build_server_config(build_parser().parse_args(["serve", "--port", "9002"]))
    assert config.port == 9002 and config.api_keys == ("a:1", "b:2") and config.data_dir == tmp_path
    assert config.engine.variant == "tiny" and config.public_url is None


def test_no_keys_only_on_loopback_unless_no_auth():
    check_auth(ServerConfig(host="127.0.0.1"))
    check_auth(ServerConfig(host="localhost"))
    check_auth(ServerConfig(host="0.0.0.0", api_keys=("a:b",)))
    check_auth(ServerConfig(host="0.0.0.0", no_auth=True))
    with pytest.raises(SystemExit, match="OVI_API_KEYS"):
        check_auth(ServerConfig(host="0.0.0.0"))
