"""A real uvicorn server on 127.0.0.1 (a free port), in a thread, for each test module.

Tests talk to it with the official ``openai`` client and, for raw or malformed requests,
with httpx. Every wait is bounded.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from engine import EngineConfig, LLMEngine
from engine.config import DEMO_DIR
from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState

BASE = "loraserve-demo"
DEMO_ADAPTERS = DEMO_DIR / "adapters"
# What each demo adapter does to a word (examples/demo/tasks.py); the base copies it.
TASKS: dict[str, Callable[[str], str]] = {
    BASE: lambda w: w,
    "upper": str.upper,
    "swapcase": str.swapcase,
}
WORDS = ["hello", "LoRA", "aB3xY", "serve9", "Qwerty", "zzTop"]


def demo_adapters(*names: str) -> dict[str, Path]:
    """The committed demo adapters ``names``, by name; fails (never skips) when one of their
    files is missing, naming each and how to restore them."""
    root = DEMO_DIR.parents[1]
    missing = [
        str((DEMO_ADAPTERS / n / f).relative_to(root))
        for n in names
        for f in ("adapter_config.json", "adapter_model.safetensors")
        if not (DEMO_ADAPTERS / n / f).is_file()
    ]
    if missing:
        pytest.fail(
            f"demo adapter files missing from this checkout: {', '.join(missing)}. They are "
            "committed in the repository: restore them with `git checkout -- examples/demo`.",
            pytrace=False,
        )
    return {n: DEMO_ADAPTERS / n for n in names}


def make_engine(adapters: dict[str, Path] | None = None, **options: Any) -> LLMEngine:
    """The demo model with ``adapters`` loaded at startup."""
    options.setdefault("max_num_seqs", 32)
    engine = LLMEngine(EngineConfig.create(None, **options))
    for name, path in (adapters or {}).items():
        engine.load_lora(name, path)
    return engine


@dataclass
class Served:
    """A running server and ways to reach it."""

    server: uvicorn.Server
    thread: threading.Thread
    state: ServerState
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, api_key: str = "unused", timeout: float = 30.0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout
        )

    def http(self, timeout: float = 30.0, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kwargs)

    def on_engine(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the engine thread (between steps) and return its result."""
        return self.state.bridge.submit_call(fn).result(timeout)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the engine holds no request and no KV page; check the pool."""
        engine = self.state.engine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = engine.stats()
            if not engine.has_unfinished() and stats.kv_pages == 0:
                self.on_engine(engine.check_integrity)
                return
            time.sleep(0.01)
        raise AssertionError(f"engine not idle after {timeout} s: {engine.stats()}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"


def serve(engine: LLMEngine, config: ServerConfig | None = None) -> Served:
    """Start uvicorn with the app in a thread, on a free loopback port."""
    app = create_app(engine, config or ServerConfig(model_name=BASE))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv_config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=5, lifespan="on"
    )
    server = uvicorn.Server(uv_config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return Served(server, thread, app.state.server, port)


@pytest.fixture(scope="module")
def demo_server() -> Iterator[Served]:
    """The demo model with the upper and swapcase adapters, no keys."""
    served = serve(make_engine(demo_adapters("upper", "swapcase")))
    yield served
    served.stop()


def complete(client: openai.OpenAI, model: str, word: str, **kwargs: Any) -> str:
    """The greedy completion of ``word=`` (the demo task's prompt)."""
    kwargs.setdefault("max_tokens", 24)
    out = client.completions.create(model=model, prompt=f"{word}=", temperature=0.0, **kwargs)
    return str(out.choices[0].text)


def assert_good(served: Served, api_key: str = "unused") -> None:
    """A good request succeeds (the check after every bad one)."""
    assert complete(served.openai(api_key), BASE, "fine") == "fine"


def assert_error(
    response: httpx.Response, status: int, code: str, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI envelope with this status, string code and (when given) param."""
    assert response.status_code == status, response.text
    assert len(response.content) < 2048  # short and bounded
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


def copy_adapter(name: str, dest: Path) -> Path:
    """A copy of a demo adapter directory (to damage or delete safely)."""
    src = demo_adapters(name)[name]
    shutil.copytree(src, dest)
    return dest
