"""The engine process: ``python -m server.engine_core``, started by ``loraserve serve``.

It owns the :class:`~engine.LLMEngine` (scheduler, runner, pool, adapters) and does nothing
but step it and answer the API process's commands over one Unix socket
(:mod:`server.engine_protocol`). :func:`main`:

1. binds the socket path it is given and admits the one client whose
   :class:`~server.engine_protocol.Hello` carries the token that came through an inherited pipe
   (:class:`~server.engine_socket.EngineSocketServer`);
2. builds the engine the :class:`EngineSpec` describes (the serve command's engine flags)
   and loads the startup adapters, then sends :class:`Ready`, or :class:`StartupFailed`
   with the error's message;
3. hands the connection to :class:`~server.engine_loop.EngineCore`, which steps the engine
   and answers calls until the connection closes.

The API process's side of all this is :class:`server.engine_process.EngineProcess`. The
process ignores SIGINT and SIGTERM (the API process drains, then closes the socket); it
exits when the socket closes, and with 1 when the engine cannot step.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from engine.llm_engine import LLMEngine
from engine.plan import served_plan
from server.engine_loop import EngineCore
from server.engine_protocol import EngineInfo, EngineSpec, Ready, StartupFailed, frame
from server.engine_socket import EngineSocketServer

logger = logging.getLogger("server.engine_core")

ENV_SOCKET = "LORASERVE_ENGINE_SOCKET"  # the path to bind
ENV_TOKEN_FD = "LORASERVE_ENGINE_TOKEN_FD"  # an inherited pipe holding the token

_ACCEPT_S = 60.0  # for the API process to connect and authenticate


def build_from_spec(spec: EngineSpec) -> LLMEngine:
    """The engine ``loraserve serve``'s flags describe, startup adapters loaded."""
    from server.serve import build_engine  # the API process's modules, only once needed

    args = argparse.Namespace(**spec.engine_args, model_dir=spec.model_dir, seed=spec.seed)
    adapters = [(name, Path(path)) for name, path in spec.lora_modules]
    sized_for = [(name, Path(path)) for name, path in spec.sized_for]
    return build_engine(args, adapters, pinned=spec.pinned_lora_modules, sized_for=sized_for)


def engine_info(engine: LLMEngine) -> EngineInfo:
    mc = engine.config.model
    return EngineInfo(
        pid=os.getpid(),
        model_dir=str(mc.model_dir),
        load_format=mc.load_format,
        max_model_len=mc.max_model_len,
        max_num_seqs=engine.config.scheduler.max_num_seqs,
        adapters=list(engine.adapters.registry.names()),
        scheduling_policy=engine.config.scheduler.policy,
        plan=served_plan(engine.config),
    )


def size_cpu_threads() -> int:
    """Leave one core to the API process: torch's intra-op threads (OpenMP) spin at their
    barriers, and with as many threads as cores a busy event loop next door preempts one
    of them at every barrier (on 2 cores, steps then take 10x longer). ``OMP_NUM_THREADS``
    set by the operator wins. Returns the number of threads."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    threads = max(1, cores - 1)
    torch.set_num_threads(threads)
    return threads


def read_token(fd: int) -> str:
    """The token from the pipe the API process wrote it into (never argv nor the
    environment, which other processes of the user can read)."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    token = b"".join(chunks).decode()
    if len(token) < 32:
        raise ValueError("no token")
    return token


def main() -> int:
    try:
        path = Path(os.environ.pop(ENV_SOCKET))
        token = read_token(int(os.environ.pop(ENV_TOKEN_FD)))
    except (KeyError, ValueError, OSError):
        sys.stderr.write("server.engine_core is started by `loraserve serve`\n")
        return 2
    # Ctrl-C and SIGTERM reach the whole process group: the API process drains, then
    # closes the socket, which ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level="WARNING", format="%(levelname)s engine %(name)s: %(message)s")
    server = EngineSocketServer(path, token, peer_pid=os.getppid())
    conn, hello, decoder = server.accept(_ACCEPT_S)
    logging.getLogger().setLevel(hello.spec.log_level.upper())
    logger.info("%d CPU threads for torch", size_cpu_threads())
    try:
        engine = build_from_spec(hello.spec)
    except Exception as e:
        message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        logger.debug("engine startup failed", exc_info=e)
        conn.sendall(frame(StartupFailed(message)))
        conn.close()
        return 2
    gc.collect()  # start-up's objects live until exit: out of the collector's sight
    gc.freeze()
    conn.sendall(frame(Ready(engine_info(engine))))
    return EngineCore(engine, conn, decoder).run()


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    os._exit(code)  # worker and composition threads end with the process
