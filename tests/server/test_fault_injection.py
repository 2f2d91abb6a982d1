"""Faults injected into a live server, in both of its forms: the engine behind a socket, as
``loraserve serve`` runs it, and the engine in a thread of the API's process.

Each test injects one fault, checks the status and ``code`` the client gets in the OpenAI
error envelope, then sends a good request and checks that it succeeds (unless the fault
ends the engine: then that it stays down, bounded, with the exit code its command would
have). The faults: an adapter's files deleted or corrupted before a reload, a slow adapter
read, a step that keeps raising, the pool filled with pins, and a full disk under a save or
an export. (The engine process killed outright: tests/server/test_engine_process.py.)

In the engine-process form the real API side (:class:`~server.engine_client.ProcessBridge`)
talks over a socket pair to the real engine side (:class:`~server.engine_loop.EngineCore`),
whose loop runs in a thread of this process where a subprocess would run it: the tests reach
into its engine (evict an adapter, slow a read, break a step, fill the disk) with no hook in
the package. Counts are asserted, never durations; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from safetensors.torch import save as safetensors_bytes

from adapters import peft_writer
from engine import export as model_export
from engine.llm_engine import LLMEngine
from server.app import create_app, create_app_for_process
from server.config import ServerConfig
from server.engine_client import QUICK_CALL_S, ProcessBridge
from server.engine_core import engine_info
from server.engine_loop import _MAX_STEP_FAILURES, EngineCore
from server.engine_process import EngineProcess
from server.engine_protocol import CheckIntegrity
from server.engine_thread import EngineBridge
from server.errors import from_storage_error
from server.state import ServerState
from tests.server.conftest import (
    BASE,
    WORDS,
    assert_error,
    complete,
    copy_adapter,
    demo_adapters,
    make_engine,
)
from tests.server.live_server import wait_for

WEIGHTS = "adapter_model.safetensors"


# -- the two forms of a server ----------------------------------------------------------


class _CoreThread:
    """What :class:`EngineProcess` needs of its ``Popen``, for an :class:`EngineCore` run in
    a thread: ``run()``'s return value is the exit code the process would have had."""

    def __init__(self, core: EngineCore) -> None:
        self.pid = os.getpid()
        self.returncode: int | None = None
        self._thread = threading.Thread(
            target=self._run, args=(core,), name="engine-core", daemon=True
        )
        self._thread.start()

    def _run(self, core: EngineCore) -> None:
        self.returncode = core.run()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("engine core", timeout or 0.0)
        assert self.returncode is not None, "the engine core raised"
        return self.returncode

    def kill(self) -> None:
        """Nothing to kill: closing the socket (which ``close`` did first) ends the loop."""


@dataclass
class Live:
    """A server on loopback and the engine behind it (in this process, in both forms).

    Attributes:
        root: the adapter root (``lora_path`` values and merges' saves).
        exports: the export root.
        core: the engine "process" (engine-process form only).
        deaths: one entry per ``on_dead`` call (``loraserve serve`` then exits 1).
    """

    engine: LLMEngine
    state: ServerState
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    root: Path
    exports: Path
    core: _CoreThread | None = None
    deaths: list[None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, timeout: float = 30.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=timeout)

    def http(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine's thread, between two steps; returns its result."""
        bridge = self.state.bridge
        if isinstance(bridge, EngineBridge):
            return bridge.submit_call(fn).result(10)
        # The engine process's loop runs an integrity check between two steps when asked:
        # run ``fn`` there, before the check.
        assert isinstance(bridge, ProcessBridge)
        engine, check, result = self.engine, self.engine.check_integrity, []

        def fn_then_check() -> None:
            del engine.check_integrity  # the method again
            result.append(fn())
            check()

        engine.check_integrity = fn_then_check  # type: ignore[method-assign]
        assert bridge._loop is not None, "the bridge has not started"
        call = bridge.call(CheckIntegrity, type(None), QUICK_CALL_S)
        asyncio.run_coroutine_threadsafe(call, bridge._loop).result(10)
        return result[0]

    def wait_idle(self) -> None:
        """Until the engine holds no request and no KV page; then check the pool."""
        engine = self.engine
        assert wait_for(lambda: not engine.has_unfinished() and engine.stats().kv_pages == 0, 10)
        self.on_engine(engine.check_integrity)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"


def _serve(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, int]:
    """uvicorn with ``app`` in a thread, on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=5, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started or not thread.is_alive(), 30) and server.started
    return server, thread, sock.getsockname()[1]


def start(mode: str, engine: LLMEngine, tmp: Path) -> Live:
    """Serve ``engine`` in ``mode`` ("engine-process" or "in-process"), adapter management
    on (``tmp/adapters`` the adapter root, ``tmp/exports`` the export root)."""
    root, exports = tmp / "adapters", tmp / "exports"
    root.mkdir()
    exports.mkdir()
    config = ServerConfig(
        model_name=BASE, allow_runtime_lora=True, adapter_roots=(root,), export_root=exports
    )
    if mode == "in-process":
        app = create_app(engine, config)
        return Live(engine, app.state.server, *_serve(app), root, exports)
    ours, theirs = socket.socketpair()
    core = _CoreThread(EngineCore(engine, theirs))
    (tmp / "engine").mkdir()
    process = EngineProcess(core, ours, tmp / "engine", engine_info(engine))  # type: ignore[arg-type]
    deaths: list[None] = []
    app = create_app_for_process(process, config, lambda: deaths.append(None))
    return Live(engine, app.state.server, *_serve(app), root, exports, core, deaths)


@pytest.fixture(scope="module", params=["engine-process", "in-process"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """The demo model with "upper" (56 pages) and "swapcase" (304) in a pool of 600 pages:
    pins may take 600 - 256 (one request at the full context) = 344 of them."""
    engine = make_engine(demo_adapters("upper", "swapcase"), num_pages=600, max_num_seqs=8)
    served = start(request.param, engine, tmp_path_factory.mktemp(request.param))
    yield served
    served.stop()
    if served.core is not None:
        assert served.core.wait(10) == 0  # the socket closed: a clean exit
    assert not served.deaths


def load(live: Live, name: str, path: str, pinned: bool = False) -> httpx.Response:
    body = {"lora_name": name, "lora_path": path, "pinned": pinned}
    with live.http() as http:
        return http.post("/v1/load_lora_adapter", json=body)


def unload(live: Live, name: str) -> None:
    with live.http() as http:
        response = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert response.status_code == 200, response.text


def models(live: Live) -> set[str]:
    return {m.id for m in live.openai().models.list().data}


def assert_good(live: Live) -> None:
    assert complete(live.openai(), BASE, "fine") == "fine"


def evict(engine: LLMEngine, name: str) -> None:
    """Out of the pool and out of host memory, as pressure on both would do (engine thread):
    the next request reads the files again."""
    entry = engine.adapters.get(name)
    if entry.id in engine.adapters.residency:
        engine.adapters.residency.evict(entry.id)
    engine.adapters.host_cache.drop(entry.id)


# -- 1. an adapter's files deleted or corrupted before a reload -------------------------


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_damaged_files_fail_only_that_adapters_requests(
    live: Live, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid at registration; deleted, or its weights truncated, then needed again after
    an eviction: its requests get 500 ``adapter_load_failed`` naming it (never the path),
    the files are tried once, not in a loop; every other adapter and the base go on, and a
    new valid adapter still loads."""
    manager = live.engine.adapters
    name = f"doomed-{damage}"
    path = copy_adapter("upper", live.root / name)
    assert load(live, name, name).status_code == 200
    client = live.openai()
    assert complete(client, name, "once") == "ONCE"
    if damage == "deleted":
        shutil.rmtree(path)
    else:
        weights = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    live.on_engine(lambda: evict(live.engine, name))
    read, reads = manager.catalog.source, []

    def counted_read(where: Path) -> Any:
        reads.append(where.name)
        return read(where)

    monkeypatch.setattr(manager.catalog, "source", counted_read)
    with live.http() as http:
        body = {"model": name, "prompt": "twice=", "temperature": 0}
        for _ in range(2):
            r = http.post("/v1/completions", json=body)
            error = assert_error(r, 500, "adapter_load_failed")
            assert name in error["message"] and str(live.root) not in error["message"]
    assert reads == [name]  # the second request met the recorded failure
    assert complete(client, "upper", "other") == "OTHER"
    assert complete(client, "swapcase", "Other") == "oTHER"
    fresh = f"fresh-{damage}"
    copy_adapter("swapcase", live.root / fresh)
    assert load(live, fresh, fresh).status_code == 200
    assert complete(client, fresh, "New") == "nEW"
    unload(live, name)
    unload(live, fresh)
    live.wait_idle()
    assert_good(live)


# -- 2. a slow adapter read -------------------------------------------------------------


def test_a_slow_adapter_read_holds_up_only_its_requests(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One adapter's files read slowly (held until released) after an eviction: resident
    adapters, the base, and another adapter that must be read again too keep being served
    meanwhile; a client that gives up on the slow one is aborted and lets go of it; the
    patient one completes once the read ends. One read serves both."""
    manager = live.engine.adapters
    for name in ("sluggish", "brisk"):
        copy_adapter("upper", live.root / name)
        assert load(live, name, name).status_code == 200
    entry = manager.get("sluggish")
    live.on_engine(lambda: [evict(live.engine, name) for name in ("sluggish", "brisk")])
    read, entered, release = manager.catalog.source, threading.Event(), threading.Event()
    reads: list[Path] = []

    def slow_read(path: Path) -> Any:
        if path.name == "sluggish":
            reads.append(path)
            entered.set()
            assert release.wait(30)
        return read(path)

    monkeypatch.setattr(manager.catalog, "source", slow_read)
    loads, steps = manager.prefetcher.stats.loads, live.engine.num_steps
    client = live.openai()
    try:
        with ThreadPoolExecutor(1) as pool:
            patient = pool.submit(complete, client, "sluggish", "slow")
            assert entered.wait(10)
            with live.http(timeout=0.3) as http, pytest.raises(httpx.TimeoutException):
                http.post("/v1/completions", json={"model": "sluggish", "prompt": "gone="})
            assert wait_for(lambda: entry.refs == 1, 10)  # the patient request's only
            for word in WORDS[:3]:
                assert complete(client, "upper", word) == word.upper()
                assert complete(client, BASE, word) == word
            assert complete(client, "brisk", "quick") == "QUICK"  # its read is not queued
            assert not patient.done()
            assert live.engine.num_steps > steps
            release.set()
            assert patient.result(30) == "SLOW"
    finally:
        release.set()
    assert len(reads) == 1
    assert manager.prefetcher.stats.loads == loads + 2
    unload(live, "sluggish")
    unload(live, "brisk")
    live.wait_idle()
    assert_good(live)


# -- 3. a step that keeps raising (the engine-process form; in-process: test_faults.py) --


def test_a_step_that_keeps_raising_ends_the_engine_process(tmp_path: Path) -> None:
    """A bug in ``step`` itself (not one batch's failure, which the engine contains): the
    request in flight gets 500 ``engine_error``; after ``_MAX_STEP_FAILURES`` attempts in a
    row the engine process exits 1, and with it ``/health`` and new requests turn 503 and
    ``loraserve serve`` is told to exit 1. No attempt after that: no busy loop."""
    engine = make_engine()
    attempts: list[None] = []

    def broken_step() -> Any:
        attempts.append(None)
        raise RuntimeError("injected: the step is broken at /secret/path")

    engine.step = broken_step  # type: ignore[method-assign]
    live = start("engine-process", engine, tmp_path)
    assert live.core is not None
    try:
        with live.http() as http:
            body = {"model": BASE, "prompt": "x="}
            error = assert_error(http.post("/v1/completions", json=body), 500, "engine_error")
            assert "/secret/path" not in error["message"]
            assert live.core.wait(10) == 1
            assert wait_for(lambda: live.deaths == [None], 10)
            health = assert_error(http.get("/health"), 503, "unhealthy")
            assert "engine" in health["message"]
            assert_error(http.post("/v1/completions", json=body), 503, "engine_unavailable")
            assert http.get("/metrics").status_code == 200
        assert len(attempts) == _MAX_STEP_FAILURES
    finally:
        live.stop()
    assert len(attempts) == _MAX_STEP_FAILURES and live.deaths == [None]


# -- 5. the pool filled with pins -------------------------------------------------------


def test_pins_fill_the_pool_then_are_refused_and_requests_still_run(live: Live) -> None:
    """Pins up to the capacity (the pool less one full-length request) load; the next is
    400 ``pin_refused`` and changes nothing; pinned, unpinned and base requests are served,
    and one that could never fit beside the pins is 400 ``request_too_large`` at once."""
    manager = live.engine.adapters
    fits = manager.pin_capacity // manager.get("upper").pages  # 6 pins of 56 pages: 336 of 344
    assert fits >= 2
    names = [f"pin-{i}" for i in range(fits + 1)]
    for name in names:
        copy_adapter("upper", live.root / name)
    for name in names[:-1]:
        reply = load(live, name, name, pinned=True)
        assert reply.status_code == 200 and reply.json()["pinned"], reply.text
    before = models(live)
    error = assert_error(
        load(live, names[-1], names[-1], pinned=True), 400, "pin_refused", "pinned"
    )
    assert "pages" in error["message"] and str(live.root) not in error["message"]
    assert models(live) == before
    assert sorted(manager.pinned_names()) == names[:-1]
    client = live.openai()
    assert complete(client, names[0], "pinned") == "PINNED"
    assert complete(client, "upper", "loose") == "LOOSE"  # unpinned: room beside the pins
    with live.http() as http:
        body = {"model": "swapcase", "prompt": "big=", "max_tokens": 4}
        assert_error(
            http.post("/v1/completions", json=body), 400, "request_too_large", "max_tokens"
        )
    assert_good(live)
    live.on_engine(live.engine.check_integrity)
    unload(live, names[0])  # room for one more pin now
    assert load(live, names[-1], names[-1], pinned=True).status_code == 200
    for name in names[1:]:
        unload(live, name)
    live.wait_idle()  # the unloads take effect at the next step
    assert complete(client, "swapcase", "Back") == "bACK"
    live.wait_idle()
    assert_good(live)


# -- 6. a full disk under a save or an export -------------------------------------------


def full_disk() -> tuple[Callable[..., None], list[str]]:
    """A ``safetensors`` ``save_file`` that writes half of the file, then finds the disk
    full (as ``write(2)`` reports it); and the list of files it began."""
    began: list[str] = []

    def save_file(tensors: dict[str, Any], filename: Any, metadata: Any = None) -> None:
        data = safetensors_bytes(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        began.append(str(filename))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    return save_file, began


def test_a_full_disk_under_a_merge_save_leaves_nothing(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``save`` finds the disk full halfway through the weights: 507 ``insufficient_storage``,
    nothing registered, nothing (not even a hidden part) left under the adapter root; the
    same merge succeeds once there is room. A save whose registration is then refused (the
    name is taken) leaves nothing either."""
    save_file, began = full_disk()
    monkeypatch.setattr(peft_writer, "save_file", save_file)
    before = sorted(os.listdir(live.root))
    merge = {
        "name": "upper-saved",
        "adapters": ["upper", "swapcase"],
        "weights": [1.0, 0.0],
        "combination_type": "cat",
        "save": True,
    }
    with live.http() as http:
        r = http.post("/v1/adapters/merge", json=merge)
        error = assert_error(r, 507, "insufficient_storage")
        assert "disk is full" in error["message"] and str(live.root) not in error["message"]
        assert len(began) == 1  # the fault was met, mid-file
        assert "upper-saved" not in models(live)
        assert sorted(os.listdir(live.root)) == before
        assert_good(live)
        monkeypatch.undo()
        r = http.post("/v1/adapters/merge", json=merge)
        assert r.status_code == 200 and r.json()["saved"], r.text
        assert sorted(os.listdir(live.root / "upper-saved")) == [
            "adapter_config.json",
            WEIGHTS,
        ]
        assert complete(live.openai(), "upper-saved", "saved") == "SAVED"
        taken = http.post("/v1/adapters/merge", json={**merge, "name": "swapcase"})
        assert_error(taken, 409, "adapter_already_loaded")
        assert sorted(os.listdir(live.root)) == sorted([*before, "upper-saved"])
    unload(live, "upper-saved")
    live.wait_idle()
    assert_good(live)


def test_a_full_disk_under_a_composition_save_leaves_nothing(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A composition whose result cannot be saved fails as a job (its error says the disk is
    full, without the path); nothing is registered or left under the adapter root."""
    save_file, began = full_disk()
    monkeypatch.setattr(peft_writer, "save_file", save_file)
    before = sorted(os.listdir(live.root))
    body = {
        "name": "composed-saved",
        "candidates": ["upper", "swapcase"],
        "examples": [{"prompt": "ab=", "completion": "AB"}],
        "method": "mixture",
        "max_steps": 2,
        "save": True,
    }
    with live.http() as http:
        started = http.post("/v1/adapters/compose", json=body)
        assert started.status_code == 202, started.text
        path = f"/v1/adapters/compose/{started.json()['id']}"
        assert wait_for(lambda: http.get(path).json()["status"] in ("failed", "succeeded"), 60)
        job = http.get(path).json()
    assert job["status"] == "failed" and len(began) == 1
    assert "disk is full" in job["error"] and str(live.root) not in job["error"]
    assert "composed-saved" not in models(live)
    assert sorted(os.listdir(live.root)) == before
    assert_good(live)


def test_a_full_disk_under_an_export_leaves_nothing(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export finds the disk full halfway through the model's weights: 507
    ``insufficient_storage``, nothing left under the export root (the same export then
    succeeds, not 409), and serving goes on."""
    save_file, began = full_disk()
    monkeypatch.setattr(model_export, "save_file", save_file)
    with live.http() as http:
        r = http.post("/v1/adapters/upper/export", json={"out": "upper-model"})
        error = assert_error(r, 507, "insufficient_storage")
        assert str(live.exports) not in error["message"]
        assert len(began) == 1
        assert os.listdir(live.exports) == []
        assert_good(live)
        monkeypatch.undo()
        r = http.post("/v1/adapters/upper/export", json={"out": "upper-model"})
        assert r.status_code == 200, r.text
    assert os.listdir(live.exports) == ["upper-model"]
    assert {"model.safetensors", "config.json"} <= set(os.listdir(live.exports / "upper-model"))
    live.wait_idle()
    assert_good(live)


def test_write_failures_map_to_a_status_without_the_path() -> None:
    """A full disk or quota is 507 ``insufficient_storage``; any other failed write 500
    ``storage_error``; the reason is given, the path never."""
    for number, status, code in (
        (errno.ENOSPC, 507, "insufficient_storage"),
        (errno.EDQUOT, 507, "insufficient_storage"),
        (errno.EACCES, 500, "storage_error"),
    ):
        error = from_storage_error(OSError(number, os.strerror(number), "/srv/x"), "the save")
        assert (error.status, error.code) == (status, code)
        assert os.strerror(number) in error.message and "/srv" not in error.message
        assert error.envelope()["error"]["type"] != "invalid_request_error"
