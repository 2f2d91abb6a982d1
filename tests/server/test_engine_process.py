"""The engine in its own process: a real ``loraserve serve`` (the default mode) driven over
HTTP, the engine side of the socket on its own, and the engine process dying.

Every server is a subprocess killed in a ``finally``; every wait is bounded.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats
from engine.sampling_params import SamplingParams
from server.adapter_ops import AdapterInfo
from server.engine_loop import EngineCore
from server.engine_protocol import (
    Abort,
    AddRequests,
    CheckIntegrity,
    EngineSpec,
    FrameDecoder,
    GetStats,
    Heartbeat,
    Hello,
    ListAdapters,
    LoadLora,
    NewRequest,
    Reply,
    StepOutputs,
    decode_to_api,
    decode_value,
    frame,
)
from server.engine_socket import EngineSocketServer
from server.errors import from_engine_value_error
from tests.server.conftest import (
    BASE,
    TASKS,
    WORDS,
    Served,
    assert_error,
    complete,
    demo_adapters,
    make_engine,
)
from tests.server.live_server import REPO, ServeProcess, free_port, loraserve, wait_for

ADMIN = {"Authorization": "Bearer admin"}
LONG = {"max_tokens": 100, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """The demo model and its four adapters ("upper" pinned), admin routes on, exports
    allowed, adapter sources on (``demo://`` names the demo adapters), the priority policy
    with users as clients (requests without a priority run first come, first served),
    vLLM's metric names too."""
    adapters = demo_adapters("upper", "swapcase", "caesar", "reverse")
    tmp = tmp_path_factory.mktemp("engine-process")
    (tmp / "exports").mkdir()
    with loraserve(
        tmp,
        "--admin-api-key",
        "admin",
        "--export-root",
        str(tmp / "exports"),
        "--lora-cache-dir",
        str(tmp / "lora-cache"),
        "--lora-source",
        f"demo={adapters['upper'].parent}",
        "--max-compose-steps",
        "4",
        "--scheduling-policy",
        "priority",
        "--fairness-key",
        "user",
        "--pinned-lora-modules",
        "upper",
        "--metrics-compat",
        "vllm",
    ) as served:
        yield served


# -- the server over HTTP -----------------------------------------------------------------


def test_completions_match_the_tasks(server: ServeProcess) -> None:
    client = server.openai()
    for model in ("upper", "swapcase", BASE):
        for word in WORDS[:3]:
            assert complete(client, model, word) == TASKS[model](word), (model, word)
    chat = client.chat.completions.create(
        model="caesar", messages=[{"role": "user", "content": "LoRA4all"}], temperature=0
    )
    assert chat.choices[0].message.content == "OrUD4doo"
    assert complete(client, "reverse", "Hello42") == "24olleH"


def test_same_text_and_logprobs_as_the_in_process_server(
    server: ServeProcess, demo_server: Served
) -> None:
    """The in-process server (tests/server/conftest.py) answers identically."""
    kwargs: dict[str, Any] = {"max_tokens": 12, "logprobs": 2, "n": 2, "seed": 5}
    for model, word in (("upper", "aB3xY"), ("swapcase", "serve9"), (BASE, "zzTop")):
        ours = server.openai().completions.create(
            model=model, prompt=f"{word}=", temperature=0.7, **kwargs
        )
        theirs = demo_server.openai().completions.create(
            model=model, prompt=f"{word}=", temperature=0.7, **kwargs
        )
        assert [c.text for c in ours.choices] == [c.text for c in theirs.choices]
        assert ours.usage == theirs.usage
        for a, b in zip(ours.choices, theirs.choices, strict=True):
            assert a.logprobs is not None and b.logprobs is not None
            assert a.logprobs.tokens == b.logprobs.tokens
            assert a.logprobs.token_logprobs == pytest.approx(b.logprobs.token_logprobs, abs=1e-5)


def test_streams_concatenate_to_the_text(server: ServeProcess) -> None:
    client = server.openai()
    stream = client.completions.create(
        model="reverse", prompt="streaming=", max_tokens=16, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks) == "gnimaerts"
    assert chunks[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model="upper",
        messages=[{"role": "user", "content": "abc"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(chat)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "ABC"
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens > 0
    details = parts[-1].usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 0  # shorter than a block


def test_text_and_stop_strings_are_rendered_in_the_api_process(
    server: ServeProcess, demo_server: Served
) -> None:
    """The engine process sends token ids only; the API process renders the text and ends a
    request at a stop string exactly as the in-process engine does (text, finish reason,
    usage, and the stream's deltas)."""
    cases = (("upper", "hello", ["L"]), ("swapcase", "Hello42", ["LO"]), (BASE, "serve9", ["e9"]))
    for model, word, stop in cases:
        kwargs: dict[str, Any] = {
            "model": model, "prompt": f"{word}=", "max_tokens": 16, "temperature": 0,
            "stop": stop,
        }  # fmt: skip
        ours = server.openai().completions.create(**kwargs)
        theirs = demo_server.openai().completions.create(**kwargs)
        assert ours.choices[0].text == theirs.choices[0].text, (model, word)
        assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason == "stop"
        assert ours.usage == theirs.usage
        streamed = list(server.openai().completions.create(stream=True, **kwargs))
        assert "".join(c.choices[0].text for c in streamed) == theirs.choices[0].text
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_errors_come_in_the_envelope(server: ServeProcess) -> None:
    with server.http() as http:
        body = {"model": "nope", "prompt": "x="}
        assert_error(http.post("/v1/completions", json=body), 404, "model_not_found", "model")
        body = {"model": BASE, "prompt": "x=", "max_tokens": 500}
        assert_error(http.post("/v1/completions", json=body), 400, "context_length_exceeded")
        body = {"model": BASE, "prompt": [[]]}
        assert_error(http.post("/v1/completions", json=body), 400, "invalid_prompt")


def test_disconnect_aborts_in_the_engine(server: ServeProcess) -> None:
    before = server.metric("loraserve:generation_tokens_total")
    body = {"model": "upper", "prompt": "abc=", "stream": True, "temperature": 0}
    with (
        server.http() as http,
        http.stream("POST", "/v1/completions", json={**body, "max_tokens": 100}) as response,
    ):
        assert next(line for line in response.iter_lines() if line.startswith("data:"))
    assert wait_for(lambda: server.metric("loraserve:num_requests_running") == 0, 10)
    assert server.metric("loraserve:generation_tokens_total") - before < 100


def test_load_unload_merge_compose_export(server: ServeProcess) -> None:
    client = server.openai()
    with server.http(headers=ADMIN) as http:
        path = str(demo_adapters("upper")["upper"])
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "up2", "lora_path": path})
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        assert complete(client, "up2", "mixed") == "MIXED"
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "up2", "lora_path": path})
        assert_error(r, 409, "adapter_already_loaded", "lora_name")
        # In place, a new version: the reply and /v1/models come from the engine process.
        swap = str(demo_adapters("swapcase")["swapcase"])
        body = {"lora_name": "up2", "lora_path": swap, "load_inplace": True}
        r = http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        cards = {m.id: m.to_dict() for m in client.models.list().data}
        assert cards["up2"]["version"] == 2 and cards["upper"]["version"] == 1
        assert complete(client, "up2", "Mixed") == "mIXED"  # the new weights
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"})
        assert r.status_code in (400, 403), r.text
        assert "up2" in {m.id for m in client.models.list().data}
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "up2"}).status_code == 200
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "up2"})
        assert_error(r, 404, "model_not_found", "lora_name")
        assert "up2" not in {m.id for m in client.models.list().data}

        merge = {
            "name": "upper-cat",
            "adapters": ["upper", "swapcase"],
            "weights": [1.0, 0.0],
            "combination_type": "cat",
        }
        r = http.post("/v1/adapters/merge", json=merge)
        assert r.status_code == 200 and r.json()["rank"] == 12, r.text
        assert complete(client, "upper-cat", "hello") == "HELLO"
        linear = {**merge, "name": "upper-linear", "combination_type": "linear"}
        assert_error(http.post("/v1/adapters/merge", json=linear), 400, "invalid_merge", "adapters")
        # A taken name is refused first, naming the name.
        r = http.post("/v1/adapters/merge", json={**merge, "combination_type": "linear"})
        assert_error(r, 409, "adapter_already_loaded", "name")

        compose = {
            "name": "composed",
            "candidates": ["upper", "swapcase"],
            "examples": [{"prompt": f"{w}=", "completion": w.upper()} for w in ("ab", "Cd")],
            "max_steps": 3,
            "method": "mixture",
        }
        r = http.post("/v1/adapters/compose", json=compose)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        deadline = time.monotonic() + 60
        while (state := http.get(f"/v1/adapters/compose/{job}").json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        assert state["status"] == "succeeded" and state["step"] == 3, state
        assert "composed" in {m.id for m in client.models.list().data}
        assert not any(m.id.startswith("_") for m in client.models.list().data)
        assert_error(http.get("/v1/adapters/compose/nope"), 404, "job_not_found")
        assert http.get("/v1/adapters/compose").json()["data"] == [state]  # the console's list

        r = http.post("/v1/adapters/upper/export", json={"out": "upper-merged"})
        assert r.status_code == 200, r.text
        r = http.post("/v1/adapters/nope/export", json={})
        assert_error(r, 404, "model_not_found", "name")
    assert complete(client, BASE, "fine") == "fine"


def test_a_source_uri_is_fetched_here_and_loaded_there(server: ServeProcess) -> None:
    """The API process fetches into its cache; the engine process loads the cached copy."""
    with server.http(headers=ADMIN) as http:
        body = {"lora_name": "demo-upper", "lora_path": "demo://upper"}
        r = http.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 200, r.text
        r = http.post("/v1/load_lora_adapter", json={**body, "lora_path": "demo://../upper"})
        assert_error(r, 400, "invalid_adapter_source", "lora_path")
    assert complete(server.openai(), "demo-upper", "hello") == "HELLO"


def test_metrics_and_health(server: ServeProcess) -> None:
    complete(server.openai(), "upper", "metric")
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        text = http.get("/metrics").text
    assert 'loraserve:request_success_total{finished_reason="stop"}' in text
    assert server.metric("loraserve:num_loaded_adapters") >= 4
    assert server.metric("loraserve:num_pool_pages") > 0
    assert server.metric("loraserve:engine_steps_total") > 0
    # The routers' families, from the snapshot that crossed the socket (one per scrape):
    # without --max-loras, max_lora is the resident-adapter limit.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [ours] = families["loraserve:lora_requests_info"].samples
    [vllms] = families["vllm:lora_requests_info"].samples
    assert ours.labels == vllms.labels and ours.labels["max_lora"] == "256"
    [waiting] = families["vllm:num_requests_waiting"].samples
    assert waiting.labels == {"model_name": BASE, "engine": "0"}
    assert waiting.value == families["loraserve:num_requests_waiting"].samples[0].value
    residency = families["loraserve:lora_adapter_info"].samples
    assert {
        (s.labels["tier"], s.labels["pinned"]) for s in residency if s.labels["adapter"] == "upper"
    } == {("pool", "true")}
    with server.http() as http:  # the status route: the engine's snapshot crosses the socket
        status = http.get("/v1/status").json()
    pool = status["pool"]
    assert pool["free"] + pool["kv"] + pool["adapter"] + pool["cached"] == pool["num_pages"]
    rows = {row["name"]: row for row in status["adapters"]}
    assert rows["upper"]["tier"] == "pool" and rows["upper"]["generated_tokens"] > 0
    assert rows["upper"]["pinned"]  # --pinned-lora-modules upper


def test_priority_user_and_pins_cross_to_the_engine_process(server: ServeProcess) -> None:
    """``priority`` and ``user`` reach the engine through the socket (the user shows as a
    client), and the startup pin shows on the adapter's card and in the metrics."""
    client = server.openai()
    out = client.completions.create(
        model="upper", prompt="pin=", max_tokens=8, temperature=0, user="dave",
        extra_body={"priority": -5},
    )  # fmt: skip
    assert out.choices[0].text == "PIN" and out.usage is not None
    with server.http() as http:
        text = http.get("/metrics").text
        body = {"model": BASE, "prompt": "x=", "priority": "high"}
        assert_error(http.post("/v1/completions", json=body), 400, "invalid_value", "priority")
    line = next(x for x in text.splitlines() if 'client_prompt_tokens_total{client="dave"}' in x)
    assert float(line.split()[-1]) == out.usage.prompt_tokens
    assert server.metric("loraserve:num_pinned_adapters") == 1
    cards = {m.id: m.to_dict() for m in client.models.list().data}
    assert cards["upper"]["pinned"] is True and cards["swapcase"]["pinned"] is False


def test_the_channel_is_private(server: ServeProcess) -> None:
    """The engine's socket lives in a 0700 directory of the user's; once the API process
    has connected, the engine listens no more (the path is gone)."""
    environ = Path(f"/proc/{server.engine_pid()}/environ").read_bytes().split(b"\0")
    variables = dict(v.decode().split("=", 1) for v in environ if b"=" in v)
    assert not any("TOKEN" in name and "FD" not in name for name in variables)
    path = Path(variables["LORASERVE_ENGINE_SOCKET"])
    mode = path.parent.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == os.getuid()
    assert not path.exists()
    cmdline = Path(f"/proc/{server.engine_pid()}/cmdline").read_bytes()
    assert cmdline.split(b"\0")[1:3] == [b"-m", b"server.engine_core"]


def test_sigterm_lets_running_requests_finish_then_exits(server: ServeProcess) -> None:
    """The last test on this server: SIGTERM drains (--drain-timeout 30, the default), the
    stream in flight ends normally, the server exits and its engine process with it."""
    stream = server.openai().completions.create(
        model="upper", prompt="abc=", temperature=0, stream=True, **LONG
    )
    chunks = iter(stream)
    first = next(chunks)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in [first, *rest])
    assert text.startswith("ABC")
    # uvicorn ends by raising the signal again once it has shut down (as test_faults.py).
    assert server.proc.wait(30) in (0, -signal.SIGTERM), server.output()


# -- the engine process dies --------------------------------------------------------------


def test_queue_bound_then_engine_death(tmp_path: Path) -> None:
    """A full queue gets 429; a stopped engine fails /health (the watchdog); a SIGKILLed
    engine ends requests in flight (an error event, a 503), new requests and /health get
    503, and the server exits non-zero."""
    args = ("--max-num-seqs", "1", "--max-waiting-requests", "1", "--num-pages", "4096")
    args += ("--engine-failure-exit-delay", "6", "--watchdog-timeout", "3")
    with loraserve(tmp_path, *args) as served:
        engine = served.engine_pid()
        client = served.openai()
        body = {"model": BASE, "prompt": "abc=", "max_tokens": 8}
        with served.http() as http:
            assert_error(
                http.post("/v1/completions", json={**body, "n": 3}), 429, "server_overloaded"
            )
        stream = iter(
            client.completions.create(
                model="upper", prompt="abc=", temperature=0, stream=True, **LONG
            )
        )
        next(stream)
        os.kill(engine, signal.SIGSTOP)  # mid-generation, nothing advances any more
        with ThreadPoolExecutor(1) as pool, served.http() as http:
            waiting = pool.submit(http.post, "/v1/completions", json=body)
            # The watchdog notices the silence (the request waits for the engine).
            assert wait_for(lambda: http.get("/health").status_code == 503, 10)
            assert "no progress" in http.get("/health").json()["error"]["message"]
            assert not waiting.done()
            os.kill(engine, signal.SIGKILL)  # the waiting request ends, bounded by result()
            assert_error(waiting.result(10), 503, "engine_unavailable")
            with pytest.raises(openai.APIError, match="engine") as died:
                list(stream)
            assert died.value.code == "engine_unavailable"  # the stream's error event
            assert_error(http.post("/v1/completions", json=body), 503, "engine_unavailable")
            health = assert_error(http.get("/health"), 503, "unhealthy")
            assert "engine" in health["message"]
            assert http.get("/metrics").status_code == 200
        assert served.proc.wait(45) == 1, served.output()


def test_startup_errors_end_the_command(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve"]
    command += ["--port", str(free_port()), "--lora-modules", "broken=/no/such/adapter"]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "loraserve: error: adapter broken:" in result.stderr


# -- the engine side of the socket --------------------------------------------------------


class _Marker:
    """Unpickling this creates ``path``: proof that a pickle was decoded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


TOKEN = "t" * 43


@contextmanager
def socket_server(tmp_path: Path) -> Iterator[tuple[EngineSocketServer, Any]]:
    """An engine socket server accepting in a thread; yields it and the accept's future."""
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    server = EngineSocketServer(directory / "engine.sock", TOKEN)
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(server.accept, 10.0)
        try:
            yield server, accepted
        finally:
            if not accepted.done():  # let the accept end: authenticate once
                with _connect(server.path) as sock:
                    sock.sendall(frame(Hello(TOKEN, EngineSpec(None, {}))))
            conn, _, _ = accepted.result(15)
            conn.close()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_pickle_is_refused_without_being_decoded(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker))
    pickle.loads(payload)  # the payload works: loading it creates the marker
    assert marker.exists()
    marker.unlink()
    with socket_server(tmp_path) as (server, accepted):
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
        for attempt in (payload, frame(Hello("wrong" * 9, EngineSpec(None, {}))), payload[:1]):
            with _connect(server.path) as sock:
                sock.sendall(attempt)
                assert _closed_by_peer(sock)
        assert not marker.exists()
        assert not accepted.done()  # still waiting for its one client
        with _connect(server.path) as sock:
            sock.sendall(frame(Hello(TOKEN, EngineSpec(None, {"dtype": "auto"}))))
            conn, hello, _ = accepted.result(10)
            conn.close()
        assert hello.spec.engine_args == {"dtype": "auto"}
    assert not server.path.exists()  # one client only: the path is gone
    with pytest.raises(OSError):
        _connect(server.path)
    assert not marker.exists()


@dataclass
class CoreClient:
    """The API side of an :class:`EngineCore` serving over a socketpair, in a thread."""

    sock: socket.socket
    decoder: FrameDecoder
    thread: threading.Thread
    code: list[int]

    def send(self, message: Any) -> None:
        self.sock.sendall(frame(message))

    def receive(self, until: Callable[[Any], bool], timeout: float = 10) -> list[Any]:
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(1 << 16)
            assert data, "the engine closed the connection"
            for payload in self.decoder.feed(data):
                message = decode_to_api(payload)
                messages.append(message)
                if until(message):
                    return messages
        raise AssertionError(f"timed out; got {messages}")

    def reply(self, call_id: int) -> Reply:
        messages = self.receive(lambda m: isinstance(m, Reply) and m.call_id == call_id)
        reply = messages[-1]
        assert isinstance(reply, Reply)
        return reply


@pytest.fixture(scope="module")
def core_engine() -> LLMEngine:
    return make_engine(demo_adapters("upper"))


@contextmanager
def running_core(engine: LLMEngine) -> Iterator[CoreClient]:
    ours, theirs = socket.socketpair()
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(EngineCore(engine, theirs).run()))
    thread.start()
    try:
        yield CoreClient(ours, FrameDecoder(), thread, code)
    finally:
        ours.close()
        thread.join(10)
        assert not thread.is_alive()


def test_engine_core_steps_answers_and_stays_consistent(core_engine: LLMEngine) -> None:
    greedy = SamplingParams(max_tokens=16, temperature=0)
    ids = list(core_engine.tokenizer("hello=").input_ids)
    with running_core(core_engine) as client:
        client.send(
            AddRequests(1, [NewRequest("a", ids, greedy, "upper"), NewRequest("b", ids, greedy)])
        )
        assert client.reply(1).error is None
        finals: dict[str, Any] = {}
        tokens: dict[str, list[int]] = {}

        def collect(m: Any) -> bool:
            if isinstance(m, StepOutputs):
                for out in m.outputs:
                    assert out.delta == ""  # the engine process sends token ids; no text
                    tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                    if out.finished:
                        finals[out.request_id] = out
            return len(finals) == 2

        client.receive(collect)
        decode = core_engine.tokenizer.decode
        texts = {rid: decode(ids, skip_special_tokens=True) for rid, ids in tokens.items()}
        assert texts == {"a": "HELLO", "b": "hello"}
        # A refusal queues nothing; its error crosses typed.
        client.send(
            AddRequests(2, [NewRequest("c", ids, greedy), NewRequest("d", ids, greedy, "nope")])
        )
        error = client.reply(2).error
        assert error is not None and (error.kind, error.code) == ("adapter", "model_not_found")
        # An abort ends a long request early.
        long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        client.send(AddRequests(3, [NewRequest("e", ids, long)]))
        assert client.reply(3).error is None
        client.send(Abort(["e"]))
        outs = client.receive(
            lambda m: (
                isinstance(m, StepOutputs)
                and any(o.finished and o.request_id == "e" for o in m.outputs)
            )
        )
        final = next(o for o in outs[-1].outputs if o.request_id == "e")
        assert final.finish_reason == "abort"
        assert len(final.token_ids) < 100
        client.send(CheckIntegrity(4))
        assert client.reply(4).error is None
        client.send(ListAdapters(5))
        infos = decode_value(client.reply(5).result, dict[str, AdapterInfo])
        assert infos == {"upper": AdapterInfo(version=1, pinned=False)}
        client.send(GetStats(6))
        assert client.reply(6).error is None
        assert client.receive(lambda m: isinstance(m, Heartbeat), timeout=5)
    assert client.code == [0]  # the connection closed: a clean exit
    assert not core_engine.has_unfinished()


def test_engine_core_takes_priority_user_and_pins() -> None:
    """``NewRequest``'s priority and user reach ``add_request``; ``LoadLora`` pins; the
    adapters' listing says which are pinned."""
    engine = make_engine(scheduling_policy="priority", fairness_key="user")
    path = str(demo_adapters("upper")["upper"])
    greedy = SamplingParams(max_tokens=16, temperature=0)
    ids = list(engine.tokenizer("pin=").input_ids)
    with running_core(engine) as client:
        client.send(LoadLora(1, "upper", path, pinned=True))
        assert decode_value(client.reply(1).result, int) == 1
        client.send(AddRequests(2, [NewRequest("a", ids, greedy, "upper", -3, "erin")]))
        assert client.reply(2).error is None
        client.receive(lambda m: isinstance(m, StepOutputs) and any(o.finished for o in m.outputs))
        client.send(ListAdapters(3))
        infos = decode_value(client.reply(3).result, dict[str, AdapterInfo])
        assert infos == {"upper": AdapterInfo(version=1, pinned=True)}
        client.send(GetStats(4))
        stats = decode_value(client.reply(4).result, EngineStats)
        assert stats.client_prompt_tokens == {"erin": len(ids)}
        assert stats.pinned_adapters == ["upper"]
    assert not engine.has_unfinished()


def test_engine_core_refuses_a_priority_the_policy_ignores(core_engine: LLMEngine) -> None:
    """The fair engine's own check: its refusal crosses as a ValueError that the routes
    map onto 400 ``param: priority`` (the API process refuses it first, from the policy
    the engine reported)."""
    greedy = SamplingParams(max_tokens=4, temperature=0)
    with running_core(core_engine) as client:
        client.send(AddRequests(1, [NewRequest("p", [5, 6, 7], greedy, None, priority=2)]))
        error = client.reply(1).error
    assert error is not None and error.kind == "value"
    api = from_engine_value_error(ValueError(error.message), "prompt")
    assert (api.status, api.code, api.param) == (400, "invalid_value", "priority")
    assert not core_engine.has_unfinished()


def test_engine_core_closes_on_a_bad_frame(core_engine: LLMEngine) -> None:
    with running_core(core_engine) as client:
        client.sock.sendall(pickle.dumps({"x": 1}))
        client.thread.join(10)
        assert client.code == [1]
        assert _closed_by_peer(client.sock)
