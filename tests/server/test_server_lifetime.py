"""A stopped server leaves nothing behind: once its app is dropped, its engine and state can
be collected, however many servers the process has built (FastAPI caches every endpoint
function it sees for the life of the process, so the routes must not close over a server)."""

from __future__ import annotations

import gc
import weakref

from server.config import ServerConfig
from tests.server.conftest import BASE, complete, make_engine, serve


def _serve_and_stop() -> tuple[weakref.ref[object], weakref.ref[object]]:
    """Build a server with every route registered, use each kind of route, stop it; weak
    references to its engine and its state."""
    engine = make_engine()
    config = ServerConfig(model_name=BASE, allow_runtime_lora=True, console=True)
    served = serve(engine, config)
    try:
        with served.http() as http:
            for path in ("/health", "/v1/models", "/v1/status", "/metrics", "/openapi.json", "/"):
                assert http.get(path).status_code == 200, path
            compositions = http.get("/v1/adapters/compose")
            assert compositions.status_code == 200
            unload = http.post("/v1/unload_lora_adapter", json={"lora_name": "absent"})
            assert unload.status_code == 404
        assert complete(served.openai(), BASE, "gone") == "gone"
    finally:
        served.stop()
    return weakref.ref(engine), weakref.ref(served.state)


def test_a_stopped_server_can_be_collected() -> None:
    engine, state = _serve_and_stop()
    gc.collect()
    assert state() is None, "something still holds the stopped server's state"
    assert engine() is None, "something still holds the stopped server's engine"
