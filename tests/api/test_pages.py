"""The pages for people (/playground, /docs, /redoc): served without a key, every asset from this server."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

NO_KEY = {"Authorization": ""}


@pytest.mark.parametrize("path", ["/playground", "/docs", "/redoc"])
def test_pages_load_only_local_assets(client: TestClient, path: str):
    page = client.get(path, headers=NO_KEY)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert assets, page.text
    for asset in assets:
        if asset.startswith("data:") or asset.startswith("/docs") and not asset.startswith("/docs/assets"):
            continue  # the playground's empty favicon; its link to /docs
        assert asset.startswith("/"), asset
        assert client.get(asset, headers=NO_KEY).status_code == 200, asset


def test_redoc_script_has_no_cdn_logo(client: TestClient):
    script = client.get("/docs/assets/redoc.standalone.js", headers=NO_KEY)
    assert script.status_code == 200 and len(script.content) > 500_000
    assert b"cdn.redoc.ly" not in script.content


def test_playground_config_says_a_key_is_needed(client: TestClient):
    config = client.get("/playground/config.json", headers=NO_KEY).json()
    assert config["auth"] is True and config["variant"] == "tiny" and config["previews"] == 5
    assert "96x64" in config["note"]  # what the tiny variant makes of the default 992x512


def test_open_server_playground_asks_for_no_key(tmp_path):
    from ovi_server.api.app import build_app
    from ovi_server.config import ServerConfig
    from ovi_server.jobs.sqlite import SqliteJobStore

    config = ServerConfig(data_dir=tmp_path)
    app = build_app(config, SqliteJobStore(tmp_path / "jobs.sqlite3"))
    with TestClient(app) as open_client:
        assert open_client.get("/playground/config.json").json()["auth"] is False
