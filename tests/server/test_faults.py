"""Load and faults: disconnects, preemption, oversized requests, a full
queue, adapters that do not fit together, failing and stuck steps, and draining."""

from __future__ import annotations

import gc
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import server.serve
from server.cli import main
from server.config import ServerConfig
from server.engine_thread import _MAX_STEP_FAILURES
from tests.server.conftest import (
    BASE,
    WORDS,
    Served,
    assert_error,
    assert_good,
    complete,
    demo_adapters,
    make_engine,
    serve,
)
from tests.server.live_server import wait_for

LONG = {"max_tokens": 100, "extra_body": {"ignore_eos": True}}  # 5 + 100 tokens: 210 pages
NUM_PAGES = 240  # the tight pool: one long request fits, two do not


@pytest.fixture(scope="module")
def tight() -> Iterator[Served]:
    """A pool for barely one long request; 8 running at most, 4 more waiting."""
    engine = make_engine(num_pages=NUM_PAGES, max_num_seqs=8)
    served = serve(engine, ServerConfig(model_name=BASE, max_waiting=4))
    yield served
    served.stop()


@contextmanager
def paused(served: Served) -> Iterator[None]:
    """Hold the engine thread between two steps (nothing advances while inside)."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(20)

    future = served.state.bridge.submit_call(hold)
    assert entered.wait(10)
    try:
        yield
    finally:
        release.set()
        future.result(10)


def generated(served: Served) -> int:
    return served.state.engine.stats().generation_tokens


def stream_body(model: str = BASE, word: str = "abc") -> dict[str, Any]:
    return {
        "model": model,
        "prompt": f"{word}=",
        "temperature": 0,
        "stream": True,
        "max_tokens": 100,
        "ignore_eos": True,
    }


def test_disconnect_mid_stream_frees_everything(demo_server: Served) -> None:
    engine = demo_server.state.engine
    before = generated(demo_server)
    with (
        demo_server.http() as http,
        http.stream("POST", "/v1/completions", json=stream_body("upper")) as response,
    ):
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert engine.adapters.get("upper").refs == 1
        closed = time.monotonic()
    demo_server.wait_idle(timeout=2)
    assert time.monotonic() - closed < 1.0
    assert generated(demo_server) - before < 100  # stopped early
    assert engine.adapters.get("upper").refs == 0  # the adapter reference is released
    assert_good(demo_server)


def test_disconnect_before_the_first_token(demo_server: Served) -> None:
    before = generated(demo_server)
    with paused(demo_server):
        with demo_server.http() as http:
            with http.stream("POST", "/v1/completions", json=stream_body("swapcase")):
                pass  # headers only: nothing generated yet
            with pytest.raises(httpx.ReadTimeout):  # a non-streamed request, given up on
                http.post("/v1/completions", json={**stream_body(), "stream": False}, timeout=0.5)
        time.sleep(0.2)  # the server notices both disconnects while the engine is held
    demo_server.wait_idle(timeout=2)
    assert generated(demo_server) - before == 0
    assert demo_server.state.engine.adapters.get("swapcase").refs == 0
    assert demo_server.state.bridge.num_pending == 0
    assert_good(demo_server)


def test_pool_exhaustion_preempts_and_outputs_match(tight: Served) -> None:
    client = tight.openai()
    jobs = [WORDS[i % len(WORDS)] for i in range(8)]
    alone = {word: complete(client, BASE, word, **LONG) for word in set(jobs)}
    preemptions = tight.state.engine.stats().num_preemptions
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda w: complete(client, BASE, w, **LONG), jobs))
    assert together == [alone[word] for word in jobs]
    assert tight.state.engine.stats().num_preemptions > preemptions
    with tight.http() as http:
        metrics = http.get("/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("loraserve:num_preemptions_total"))
    assert float(line.split()[-1]) > 0
    tight.wait_idle()


def test_request_larger_than_the_pool_is_refused(tight: Served) -> None:
    with tight.http() as http:
        body = {"model": BASE, "prompt": "abc=", "max_tokens": NUM_PAGES // 2}
        assert_error(
            http.post("/v1/completions", json=body), 400, "request_too_large", "max_tokens"
        )
    tight.wait_idle()
    assert_good(tight)


def test_queue_full_is_429_at_once(tight: Served) -> None:
    limit = tight.state.bridge.max_pending  # 8 running + 4 waiting
    client = tight.openai()
    with ThreadPoolExecutor(1) as pool:
        with paused(tight):
            prompts = ["a="] * (limit // 2)
            queued = pool.submit(
                lambda: client.completions.create(model=BASE, prompt=prompts, n=2, max_tokens=4)
            )
            assert wait_for(lambda: tight.state.bridge.num_pending == limit, 5)
            with tight.http() as http:
                started = time.monotonic()
                response = http.post("/v1/completions", json={"model": BASE, "prompt": "b="})
                assert time.monotonic() - started < 1.0
            assert_error(response, 429, "server_overloaded")
            assert response.headers["Retry-After"] == "1"
            assert tight.state.bridge.num_pending == limit  # the queue did not grow
        assert len(queued.result(30).choices) == limit
    assert_good(tight)


def test_more_adapters_than_fit_wait_their_turn() -> None:
    """All four demo adapters take ~2200 pages; the pool has 1400. None fails."""
    adapters = demo_adapters("upper", "swapcase", "caesar", "reverse")
    served = serve(make_engine(adapters, num_pages=1400, max_num_seqs=16))
    try:
        client = served.openai()
        jobs = [(m, w) for w in WORDS[:3] for m in adapters]
        alone = {job: complete(client, *job) for job in jobs}
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda job: complete(client, *job), jobs * 2))
        assert together == [alone[job] for job in jobs * 2]
        assert served.state.engine.stats().adapter_evictions > 0
        served.wait_idle()
        assert_good(served)
    finally:
        served.stop()


def fail_next_step(served: Served) -> None:
    runner = served.state.engine.runner
    original = runner.execute

    def failing(*args: Any) -> Any:
        runner.execute = original  # type: ignore[method-assign]
        raise RuntimeError("injected failure at /secret/path")

    served.on_engine(lambda: setattr(runner, "execute", failing))


def test_a_failed_step_fails_its_requests_only(demo_server: Served) -> None:
    fail_next_step(demo_server)
    with demo_server.http() as http:
        error = assert_error(
            http.post("/v1/completions", json={"model": BASE, "prompt": "x="}), 500, "engine_error"
        )
        assert "/secret/path" not in error["message"]
        assert http.get("/health").status_code == 200
    assert_good(demo_server)
    fail_next_step(demo_server)
    stream = demo_server.openai().completions.create(model=BASE, prompt="y=", stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
    demo_server.wait_idle()
    assert_good(demo_server)


def test_watchdog_reports_a_stuck_engine(demo_server: Served) -> None:
    bridge, runner = demo_server.state.bridge, demo_server.state.engine.runner
    original, release = runner.execute, threading.Event()

    def stuck(*args: Any) -> Any:
        runner.execute = original  # type: ignore[method-assign]
        release.wait(20)
        return original(*args)

    bridge.watchdog_s = 0.3
    demo_server.on_engine(lambda: setattr(runner, "execute", stuck))
    try:
        with ThreadPoolExecutor(1) as pool, demo_server.http() as http:
            pending = pool.submit(complete, demo_server.openai(), BASE, "slow")
            assert wait_for(lambda: http.get("/health").status_code == 503, 5)
            assert_error(http.get("/health"), 503, "unhealthy")
            release.set()
            assert pending.result(10) == "slow"
            assert wait_for(lambda: http.get("/health").status_code == 200, 5)
    finally:
        release.set()
        bridge.watchdog_s = 60.0
    assert_good(demo_server)


def test_an_engine_that_cannot_recover_turns_health_503() -> None:
    """``step`` itself raises every time: the request gets 500, the engine thread gives up
    after ``_MAX_STEP_FAILURES`` attempts in a row (counted: no busy loop), ``/health`` and
    new requests get 503. (The engine process: tests/server/test_fault_injection.py.)"""
    served = serve(make_engine())
    attempts: list[None] = []

    def broken_step() -> Any:
        attempts.append(None)
        raise ZeroDivisionError("injected")

    try:
        served.state.engine.step = broken_step  # type: ignore[method-assign]
        with served.http() as http:
            body = {"model": BASE, "prompt": "x="}
            assert_error(http.post("/v1/completions", json=body), 500, "engine_error")
            assert wait_for(lambda: http.get("/health").status_code == 503, 5)
            assert "stopped" in assert_error(http.get("/health"), 503, "unhealthy")["message"]
            assert_error(http.post("/v1/completions", json=body), 503, "engine_unavailable")
        assert len(attempts) == _MAX_STEP_FAILURES
        assert served.state.bridge.num_pending == 0
        assert served.state.bridge.dead  # so `loraserve serve` exits 1, as with a process
    finally:
        served.stop()
    assert len(attempts) == _MAX_STEP_FAILURES


def test_loraserve_serve_in_process_exits_1_when_its_engine_dies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--engine-in-process``: an engine thread that dies ends ``loraserve serve`` with
    status 1, as a dead engine process does (a supervisor restarts it)."""
    real_build = server.serve.build_engine

    def broken_build(*args: Any, **kwargs: Any) -> Any:
        engine = real_build(*args, **kwargs)

        def broken_step() -> Any:
            raise ZeroDivisionError("injected")

        engine.step = broken_step
        engine.has_unfinished = lambda: True  # step at once, no request needed
        return engine

    monkeypatch.setattr(server.serve, "build_engine", broken_build)
    monkeypatch.setattr(gc, "freeze", lambda: None)  # the test process's heap stays collectable
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = ["--engine-in-process", "--engine-failure-exit-delay", "0", "--port", str(port)]
    assert main(["serve", *flags, "--max-num-seqs", "4", "--no-access-log"]) == 1


def test_drain_stops_admitting_then_aborts_the_rest() -> None:
    served = serve(make_engine())
    try:
        client = served.openai()
        with ThreadPoolExecutor(1) as pool, paused(served):
            stream = pool.submit(
                lambda: list(
                    client.completions.create(
                        model=BASE,
                        prompt="abc=",
                        stream=True,
                        max_tokens=100,
                        extra_body={"ignore_eos": True},
                    )
                )
            )
            assert wait_for(lambda: served.state.bridge.num_pending == 1, 5)
            served.state.bridge.request_drain(0.2)
            with served.http() as http:
                assert wait_for(lambda: http.get("/health").status_code == 503, 5)
                body = {"model": BASE, "prompt": "new="}
                assert_error(http.post("/v1/completions", json=body), 503, "server_shutting_down")
            time.sleep(0.3)  # the drain timeout passes while the engine is held
        chunks = stream.result(10)
        assert str(chunks[-1].choices[0].finish_reason) == "abort"
        served.wait_idle()
    finally:
        served.stop()


def test_drain_lets_running_requests_finish() -> None:
    served = serve(make_engine())
    try:
        client = served.openai()
        expected = complete(client, BASE, "abc", **LONG)
        with ThreadPoolExecutor(1) as pool:
            with paused(served):
                pending = pool.submit(complete, client, BASE, "abc", **LONG)
                assert wait_for(lambda: served.state.bridge.num_pending == 1, 5)
                served.state.bridge.request_drain(30)
            assert pending.result(10) == expected
    finally:
        served.stop()


def test_sigterm_aborts_in_flight_streams_and_exits() -> None:
    """The real command line: SIGTERM with --drain-timeout 0 aborts what runs, then exits."""
    repo = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve"]
    command += ["--port", str(port), "--drain-timeout", "0", "--no-access-log"]
    proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _healthy(url), 90), "the server did not come up"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        streams = [
            iter(
                client.completions.create(
                    model=BASE,
                    prompt=f"{w}=",
                    temperature=0,
                    stream=True,
                    max_tokens=120,
                    extra_body={"ignore_eos": True},
                )
            )
            for w in ("abc", "xyz")
        ]
        for stream in streams:
            next(stream)
        proc.send_signal(signal.SIGTERM)
        for stream in streams:
            last = list(stream)[-1]
            assert str(last.choices[0].finish_reason) == "abort"  # vLLM's, beyond OpenAI's
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
