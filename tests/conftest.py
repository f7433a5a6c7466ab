"""Shared fixtures: the real bundled model, exported once per test run, and a live server on it."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from halflife.api.server import ServerConfig
from halflife.embedding.manifest import MANIFEST_NAME
from tests.serving import ServerThread

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The bundled all-MiniLM-L6-v2, exported once: `make test` passes the
    directory `make model` wrote; otherwise it is exported here."""
    given = os.environ.get("HALFLIFE_TEST_MODEL_DIR")
    if given and (Path(given) / MANIFEST_NAME).is_file():
        return Path(given)
    from halflife_export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("bundled") / "all-MiniLM-L6-v2"
    export_model(ExportOptions(output=out))
    return out


@pytest.fixture(scope="session")
def live_server(model_dir, tmp_path_factory):
    """One server on the real model for the whole run, on a free port of 127.0.0.1."""
    config = ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path_factory.mktemp("data"))
    with ServerThread(config) as server:
        yield server


@pytest.fixture()
def channel(live_server):
    with grpc.insecure_channel(live_server.address) as channel:
        yield channel
