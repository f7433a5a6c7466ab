"""clients/ghz/*.json: each config names a real RPC, its data fits the request message, and it runs
against a live server (through `halflife loadtest --config`, which reads ghz configs as they are)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from halflife.api.server import API_SERVICES, ServerConfig
from halflife.loadtest import method_descriptor, options_from_ghz_config, request_factory, run_load_test
from halflife.v1 import interest_pb2
from halflife_client import Event, HalflifeClient, Item
from tests.serving import ServerThread

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "clients" / "ghz").glob("*.json"))
# From the served services: a new RPC needs its config.
RPCS = {f"{service.full_name}.{method.name}" for service, _ in API_SERVICES for method in service.methods}


def test_every_rpc_has_a_config():
    calls = {json.loads(path.read_text())["call"] for path in CONFIGS}
    assert RPCS <= calls


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_matches_the_protos(path):
    config = json.loads(path.read_text())
    method = method_descriptor(config["call"])
    assert config["host"].startswith("127.0.0.1:") and config["insecure"] is True
    # Strict proto3 JSON parsing: an unknown or misspelt field fails here.
    make = request_factory(method, json.dumps(config["data"]))
    assert make(7).DESCRIPTOR.full_name == method.input_type.full_name


@pytest.mark.parametrize("maker, cleaner", [("record-events.json", "delete-user.json"),
                                             ("upsert-items.json", "delete-items.json")])
def test_each_cleanup_config_removes_all_its_maker_creates(maker, cleaner):
    """Both name their users / items by {{.RequestNumber}}: the cleanup needs the same total."""
    totals = [json.loads((CONFIGS[0].parent / name).read_text())["total"] for name in (maker, cleaner)]
    assert totals[0] == totals[1]


@pytest.fixture(scope="module")
def seeded_server(model_dir, tmp_path_factory):
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path_factory.mktemp("ghz"))) as server:
        with HalflifeClient(server.address) as client:
            client.upsert_items([Item(id=str(i), text=f"film number {i}", categories=["Drama"]) for i in range(1, 6)])
            client.record_events([Event(event_id="seed", user_id="1", type=interest_pb2.EVENT_TYPE_LIKE, item_id="2")])
        yield server


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_runs_against_a_live_server(path, seeded_server):
    options = options_from_ghz_config(path, target=seeded_server.address, total=3, concurrency=1)
    report = asyncio.run(run_load_test(options))
    assert report["count"] == 3
    assert report["statusCodeDistribution"] == {"OK": 3}, report["errorDistribution"]
