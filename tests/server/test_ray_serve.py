"""``loraserve serve --ray-replicas 2`` on the demo, as a user runs it: a local Ray instance
on the CPU, two replicas, the ingress on loopback.

Requests for every demo model come back right; repeated requests for one adapter land on the
replica that holds it (the replicas' own answers and status say which); a replica killed
mid-traffic fails only its in-flight requests, cleanly, and Ray replaces it. Every wait is
bounded, and the whole Ray instance is killed on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import BASE, demo_adapters
from tests.server.live_server import REPO, ServeProcess, free_port, wait_for
from tests.server.test_console import demo_task

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

USER = {"Authorization": "Bearer ray-user"}
ADAPTERS = ("upper", "swapcase", "caesar", "reverse", "lower")
REPLICA_HEADER = "x-loraserve-replica"
REPLICA_TITLE = b"ServeReplica:loraserve:LoraServeReplica"


class RayServer(ServeProcess):
    """``loraserve serve --ray-replicas 2``: the Ray instance is its process group."""

    def complete(self, model: str, word: str, **extra: object) -> httpx.Response:
        body = {"model": model, "prompt": f"{word}=", "max_tokens": 16, "temperature": 0}
        return httpx.post(self.url + "/v1/completions", json=body | extra, headers=USER, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    demo_adapters(*ADAPTERS)
    tmp = tmp_path_factory.mktemp("ray")
    port = free_port()
    log = tmp / "serve.log"
    command = [sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve"]
    command += ["--ray-replicas", "2", "--port", str(port), "--no-access-log"]
    command += ["--api-key", "ray-user", "--admin-api-key", "ray-admin", "--drain-timeout", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env |= {"OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    # Ray's router asks the replica holding an adapter for its queue length and, past this
    # deadline (0.1 s by default), sends the request elsewhere: on two busy cores that happens
    # by chance (docs/scale-out.md).
    env |= {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "2"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    served = RayServer(proc, port, log)
    try:
        # Up when both replicas answer (Ray sends nothing to a replica still starting).
        seen: set[str] = set()

        def both_up() -> bool:
            if proc.poll() is not None:
                return True
            try:
                reply = served.complete(BASE, "up")
            except httpx.HTTPError:
                return False
            if reply.status_code == 200:
                seen.add(reply.headers[REPLICA_HEADER])
            return len(seen) == 2

        assert wait_for(both_up, 240) and proc.poll() is None, served.output()
        yield served
    finally:
        with_group(proc, signal.SIGKILL)  # the server and all of its Ray instance
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        assert wait_for(lambda: not replica_pids(), 15), "replicas outlived the server"


def with_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def replica_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if REPLICA_TITLE in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_every_demo_model_answers_through_the_replicas(server: RayServer) -> None:
    for model in (BASE, *ADAPTERS):
        for word in ("Hello3", "aB9z"):
            reply = server.complete(model, word)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == demo_task(model)(word), model
    # Streaming, errors and keys are the server's own.
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": "reverse", "prompt": "abc=", "max_tokens": 8, "stream": True},
        headers=USER,
        timeout=60,
    ) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 4
    assert server.complete("nope", "x").json()["error"]["code"] == "model_not_found"
    no_key = httpx.get(server.url + "/v1/models", timeout=10)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    models = httpx.get(server.url + "/v1/models", headers=USER, timeout=10).json()["data"]
    assert {m["id"] for m in models} == {BASE, *ADAPTERS}


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(server: RayServer) -> None:
    # A name no earlier test asked for, so no replica holds it yet (two requests racing the
    # routing table's update may both load an adapter, as Ray allows, and then both hold it).
    admin = {"Authorization": "Bearer ray-admin"}
    body = {"lora_name": "affine", "lora_path": "caesar"}
    loaded = httpx.post(server.url + "/v1/load_lora_adapter", json=body, headers=admin)
    assert loaded.status_code == 200, loaded.text
    # The load went to one replica, which now holds the adapter. It reports what it holds to
    # Ray's controller every 0.1 s, which passes it on to the router: give that a moment, so
    # requests are routed by it, not by chance (a request routed before would make the other
    # replica load the adapter too, and both would then hold it).
    time.sleep(3)
    first = server.complete("affine", "w").headers[REPLICA_HEADER]
    answered = Counter(server.complete("affine", f"w{i}").headers[REPLICA_HEADER] for i in range(8))
    assert answered == {first: 8}, answered  # every one on the replica that loaded it
    # The replicas' own status: the adapter is registered on that replica only.
    holds: dict[str, bool] = {}
    deadline = time.monotonic() + 30
    while len(holds) < 2 and time.monotonic() < deadline:
        reply = httpx.get(server.url + "/v1/status", headers=USER, timeout=10)
        names = {a["name"] for a in reply.json()["adapters"]}
        holds[reply.headers[REPLICA_HEADER]] = "affine" in names
    assert holds == {first: True, **{r: False for r in holds if r != first}}, holds
    assert len(holds) == 2
    unloaded = httpx.post(
        server.url + "/v1/unload_lora_adapter", json={"lora_name": "affine"}, headers=admin
    )
    assert unloaded.status_code == 200


def test_hot_loads_reach_the_replicas(server: RayServer) -> None:
    admin = {"Authorization": "Bearer ray-admin"}

    def load(path: str, name: str = "mirror") -> httpx.Response:
        body = {"lora_name": name, "lora_path": path}
        return httpx.post(server.url + "/v1/load_lora_adapter", json=body, headers=admin)

    assert load("reverse").json()["version"] == 1
    assert server.complete("mirror", "abc9").json()["choices"][0]["text"] == "9cba"
    assert load("reverse").status_code == 409  # loaded already, as with one server
    refused = load("no-such-adapter", "ghost")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_not_found"
    unloaded = httpx.post(
        server.url + "/v1/unload_lora_adapter", json={"lora_name": "mirror"}, headers=admin
    )
    assert unloaded.status_code == 200
    assert server.complete("mirror", "abc9").json()["error"]["code"] == "model_not_found"
    # The name again, other weights: a newer version, swapped in where the old one is held.
    assert load("upper").json()["version"] == 2
    for word in ("abc9", "xyZ"):
        assert server.complete("mirror", word).json()["choices"][0]["text"] == word.upper()
    user = httpx.post(server.url + "/v1/load_lora_adapter", json={}, headers=USER)
    assert user.status_code == 403


@dataclass
class Traffic:
    server: RayServer
    stop: threading.Event = field(default_factory=threading.Event)
    replies: list[tuple[str, str, int, str, str]] = field(default_factory=list)

    def run(self, i: int) -> None:
        model = ("upper", "reverse", BASE)[i % 3]
        n = 0
        while not self.stop.is_set():
            word = f"k{i}x{n}"
            n += 1
            try:
                reply = self.server.complete(model, word)
            except httpx.HTTPError as e:
                self.replies.append((model, word, 0, "", repr(e)))
                continue
            text = reply.json()["choices"][0]["text"] if reply.status_code == 200 else reply.text
            self.replies.append(
                (model, word, reply.status_code, reply.headers.get(REPLICA_HEADER, ""), text)
            )


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(server: RayServer) -> None:
    victims = replica_pids()
    assert len(victims) == 2
    traffic = Traffic(server)
    threads = [threading.Thread(target=traffic.run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: len(traffic.replies) >= 8, 60)
        os.kill(victims[0], signal.SIGKILL)
        killed_at = len(traffic.replies)
        # Ray starts a replica in its place; traffic goes on meanwhile.
        assert wait_for(lambda: len(set(replica_pids()) - set(victims)) == 1, 120)
        before = {r[3] for r in traffic.replies[:killed_at]}
        assert wait_for(lambda: {r[3] for r in traffic.replies} - before - {""}, 180), (
            "the new replica never answered"
        )
    finally:
        traffic.stop.set()
        for thread in threads:
            thread.join(60)
    failed = [r for r in traffic.replies if r[2] != 200]
    assert len(failed) <= len(threads), failed  # at most the requests in flight on it
    for _, _, status, _, body in failed:
        assert status == 503 and "replica_unavailable" in body, body
    for model, word, status, _, text in traffic.replies:
        if status == 200:
            assert text == demo_task(model)(word), (model, word, text)
    assert len(traffic.replies) - len(failed) > killed_at  # traffic went on


def test_serve_run_builds_the_application_from_the_flags() -> None:
    """``serve run``'s entry point: the flags of ``loraserve serve``, no Ray started; each
    replica holds as many adapters as the plan fits in its pool."""
    from ray.serve import Application

    from engine.config import EngineConfig
    from server.ray_serve import adapters_per_replica, app_builder

    application = app_builder({"flags": "--ray-replicas 3 --max-num-seqs 16"})
    assert isinstance(application, Application)
    # 16 sequences of 128 tokens: a 4,096-page pool, which holds one rank-64 adapter on
    # every linear layer beside a full-length request; 64 sequences: six.
    assert adapters_per_replica(EngineConfig.create(max_num_seqs=16, device="cpu")) == 1
    assert adapters_per_replica(EngineConfig.create(max_num_seqs=64, device="cpu")) == 6
