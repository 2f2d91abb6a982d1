"""A real ``loraserve serve`` in a subprocess, for tests that drive it as a user would.

Every server is killed on the way out (and its engine process seen to end); every wait is
bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from server.bench.harness import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@dataclass
class ServeProcess:
    """``loraserve serve`` in a subprocess (the engine in its own process below it)."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, timeout: float = 30.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=timeout)

    def http(self, timeout: float = 30.0, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kwargs)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def engine_pid(self) -> int:
        """The engine process: this server's child running ``server.engine_core``."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and b"server.engine_core" in cmdline:
                return int(entry.name)
        raise AssertionError("no engine process under the server")

    def metric(self, name: str) -> float:
        with self.http() as http:
            text = http.get("/metrics").text
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        return float(line.split()[-1])

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextmanager
def loraserve(tmp: Path, *args: str) -> Iterator[ServeProcess]:
    """Start ``loraserve serve ARGS`` on a free port; always killed on the way out."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    command = [sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve"]
    command += ["--port", str(port), "--no-access-log", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = ServeProcess(proc, port, log)
    engine_pid = None
    try:
        ok = wait_for(lambda: served.healthy() or proc.poll() is not None, 120)
        assert ok and proc.poll() is None, f"the server did not come up:\n{served.output()}"
        engine_pid = served.engine_pid()
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if engine_pid is not None:
            # Its socket closed with the API process: the engine process ends by itself.
            gone = wait_for(lambda: not _alive(engine_pid), 15)
            with suppress(ProcessLookupError):
                os.kill(engine_pid, signal.SIGKILL)
            assert gone, "the engine process outlived the API process"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
