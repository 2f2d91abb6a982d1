"""A ``loraserve serve`` subprocess for the benchmarks that measure through the HTTP API.

``bench prefix``, ``bench fairness`` and ``benchmarks/compare.py`` replay a request list
against a real server as users reach it: :func:`running_server` starts ``python -m server.cli
serve`` on a free loopback port with the flags of a :class:`ServerSpec`, waits until
``/health`` answers 200, sends one short warm-up request, yields the base URL, and stops the
server on the way out (SIGTERM, a bounded wait, then kill). The server's output goes to a
log file, and a server that exits during start-up (a bad flag, say) raises with the log's
tail.

Every system of a run gets the same number of torch threads: ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` in the server's environment (:func:`thread_env`), and
``torch.set_num_threads`` for what runs in the benchmark's process.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

logger = logging.getLogger(__name__)

SERVED_BASE = "bench-base"  # the server's API name for the base model
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServerSpec:
    """How to start ``loraserve serve`` for a benchmark.

    Attributes:
        model_dir: the model directory (or a preset's, with ``load_format="dummy"``).
        dtype: ``--dtype``.
        load_format: ``--load-format``.
        max_num_seqs: ``--max-num-seqs``: requests the engine runs at once.
        max_lora_rank: ``--max-lora-rank``.
        max_loras: ``--max-loras``.
        max_waiting_requests: ``--max-waiting-requests``; at least the requests that can be
            outstanding at once, so that none is refused.
        threads: OpenMP/MKL threads of the server's processes.
        adapters: served as ``--lora-modules NAME=PATH``; the name is the API model name.
        extra_flags: appended to the command as they are (e.g. ``--no-enable-prefix-caching``).
        startup_timeout_s: how long to wait for ``/health``.
    """

    model_dir: Path
    dtype: str
    load_format: str
    max_num_seqs: int
    max_lora_rank: int
    max_loras: int
    max_waiting_requests: int
    threads: int
    adapters: tuple[tuple[str, Path], ...] = ()
    extra_flags: tuple[str, ...] = ()
    startup_timeout_s: float = 600.0


def server_command(spec: ServerSpec, port: int) -> list[str]:
    """``loraserve serve`` with the spec's flags, on 127.0.0.1:``port``."""
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "--log-level",
        "WARNING",
        "serve",
        str(spec.model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        SERVED_BASE,
        "--dtype",
        spec.dtype,
        "--load-format",
        spec.load_format,
        "--max-num-seqs",
        str(spec.max_num_seqs),
        "--max-lora-rank",
        str(spec.max_lora_rank),
        "--max-loras",
        str(spec.max_loras),
        "--max-waiting-requests",
        str(spec.max_waiting_requests),
        "--no-access-log",
    ]
    if spec.adapters:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in spec.adapters)]
    return command + list(spec.extra_flags)


def thread_env(threads: int) -> dict[str, str]:
    """This process's environment with ``threads`` OpenMP/MKL threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@contextmanager
def running_server(spec: ServerSpec, log_path: Path) -> Iterator[str]:
    """Start the server, wait until it is healthy and warmed up, yield its base URL, stop it.

    The command line and the server's output are appended to ``log_path``.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = server_command(spec, port)
    logger.info("starting %s", " ".join(command))
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=thread_env(spec.threads), stdout=log, stderr=log
        )
        try:
            _wait_healthy(proc, url, spec.startup_timeout_s, log_path)
            _warm_up(url)
            yield url
        finally:
            stop_server(proc)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:]
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not healthy within {timeout_s:g} s (log: {log})")


def _warm_up(url: str) -> None:
    """One short request, as ``run_loraserve`` warms its engine before timing."""
    body = {"model": SERVED_BASE, "prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120.0)
    if response.status_code != 200:
        raise RuntimeError(
            f"the warm-up request failed: HTTP {response.status_code}: {response.text[:300]}"
        )


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, wait up to ``timeout_s``, then kill."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("the server ignored SIGTERM for %g s; killing it", timeout_s)
        proc.kill()
        proc.wait(timeout=timeout_s)


def machine_info(threads: int) -> dict[str, Any]:
    """What the results were measured on, for the JSON record."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
