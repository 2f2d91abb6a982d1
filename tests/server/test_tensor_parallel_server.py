"""``loraserve serve --tensor-parallel-size 2`` on the demo, as a user runs it: two gloo
workers on loopback under the engine process.

The demo's LoRA adapters answer right (its prefix-tuned one is skipped, with a warning);
merges, compositions and exports work on the split model; a worker killed turns ``/health``
to 503 at once and the server exits on its own, leaving no process behind. The tests share
one server, in file order: the last one ends it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import BASE
from tests.server.live_server import ServeProcess, loraserve, wait_for
from tests.server.test_console import demo_task

pytestmark = pytest.mark.slow

LORA_ADAPTERS = ("upper", "swapcase", "caesar", "reverse")
WORKER = b"engine.parallel.worker"


def complete(server: ServeProcess, model: str, word: str) -> str:
    body = {"model": model, "prompt": f"{word}=", "max_tokens": 16, "temperature": 0}
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    text: str = reply.json()["choices"][0]["text"]
    return text


def workers(parent: int) -> list[int]:
    """The tensor-parallel workers under the engine process ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == parent and WORKER in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("tp")
    args = ("--tensor-parallel-size", "2", "--engine-failure-exit-delay", "2")
    args += ("--enable-runtime-lora-loading",)
    args += ("--export-root", str(tmp / "exports"))
    with loraserve(tmp, *args) as served:
        yield served


def test_demo_adapters_answer_through_two_workers(server: ServeProcess) -> None:
    assert len(workers(server.engine_pid())) == 2
    for model in (BASE, *LORA_ADAPTERS):
        for word in ("Hello3", "aB9z"):
            assert complete(server, model, word) == demo_task(model)(word), model
    models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    assert {m["id"] for m in models} == {BASE, *LORA_ADAPTERS}
    assert "demo adapter lower is prefix_tuning" in server.output()


def test_merges_compositions_and_exports_work_split(server: ServeProcess) -> None:
    with server.http() as http:
        merged = http.post(
            "/v1/adapters/merge",
            json={"name": "upper2", "adapters": ["upper"], "weights": [1.0],
                  "combination_type": "linear"},
        )  # fmt: skip
        assert merged.status_code == 200, merged.text
        assert complete(server, "upper2", "abc9") == "ABC9"
        job = http.post(
            "/v1/adapters/compose",
            json={"name": "composed", "examples": [{"prompt": "ab=", "completion": "AB"}],
                  "candidates": ["upper", "reverse"], "method": "mixture", "max_steps": 3},
        )  # fmt: skip
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 120
        state = job.json()
        while state["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            state = http.get(f"/v1/adapters/compose/{state['id']}").json()
        assert state["status"] == "succeeded", state
        exported = http.post("/v1/adapters/reverse/export", json={})
        assert exported.status_code == 200, exported.text


def test_a_worker_that_dies_ends_the_server(server: ServeProcess) -> None:
    engine = server.engine_pid()
    victim = workers(engine)[1]
    os.kill(victim, signal.SIGKILL)
    # Noticed between steps, with no request running: unhealthy within the engine's poll.
    assert wait_for(lambda: not server.healthy(), 10), server.output()
    reply = httpx.post(
        server.url + "/v1/completions",
        json={"model": "reverse", "prompt": "ab=", "max_tokens": 4},
        timeout=10,
    )
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_unavailable"
    assert wait_for(lambda: server.proc.poll() is not None, 30), server.output()
    assert server.proc.returncode == 1
    assert wait_for(lambda: not workers(engine), 10), "a worker outlived the server"
    assert "tensor-parallel worker 1 exited" in server.output()
