"""A tracking server opened to other machines authenticates them (docs/scaling.md): ``mlflow server --app-name
basic-auth`` on loopback, its admin password and secret key from the environment, refuses a request without
credentials (HTTP 401) and serves one with them."""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from services import mlflow_server

ADMIN = "admin"  # MLflow's admin user; its password is set on the first start from MLFLOW_AUTH_ADMIN_PASSWORD
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def get(url: str, credentials: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode("ascii")
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            json.load(response)
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_basic_auth_refuses_requests_without_credentials_and_serves_the_admin(tmp_path: Path):
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (the dev extra has it)")
    password = secrets.token_urlsafe(16)
    config = tmp_path / "basic_auth.ini"  # the users' database in the test's folder, not the working directory
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'users.db'}\n"
                      f"admin_username = {ADMIN}\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "server.log",
                       app_name="basic-auth", env=env) as url:
        assert get(url + SEARCH) == 401
        assert get(url + SEARCH, (ADMIN, "not-the-password")) == 401
        assert get(url + SEARCH, (ADMIN, password)) == 200
