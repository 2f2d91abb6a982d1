"""The engine process's channel to its tensor-parallel workers: messages and their framing.

One private socket pair per worker (the child inherits its end; nothing else can reach it).
Each frame is an 8-byte big-endian length and one msgspec Struct of :data:`ToWorker` or
:data:`FromWorker` as MessagePack. A step travels as the scheduler wrote it
(:class:`engine.scheduler_output.SchedulerOutput`), except that each worker gets its own
part of each placement (its weight tensors as raw bytes with their dtype and shape); the per-request
random generators stay behind (each worker keeps its own, seeded alike, so all draw the same
numbers). Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from typing import Any

import msgspec
import torch

from engine.quantization import QuantizationReport
from engine.scheduler_output import ChunkResult, SchedulerOutput

_LENGTH = struct.Struct(">Q")
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int32,
                               torch.int64, torch.uint8, torch.bool)}  # fmt: skip


class WorkerSpec(msgspec.Struct, frozen=True):
    """What a worker builds: its part of the model and pool, and how to join the group."""

    rank: int
    size: int
    model_dir: str
    dtype: str
    device: str
    quantization: str
    load_format: str
    seed: int
    num_pages: int
    max_num_seqs: int
    max_model_len: int
    max_slots: int
    max_lora_rank: int
    kernels: str
    store_port: int  # the rendezvous: a TCPStore the engine process hosts on loopback
    timeout_s: float


class Step(msgspec.Struct, frozen=True, tag="step"):
    output: SchedulerOutput


class Report(msgspec.Struct, frozen=True, tag="report"):
    """Ask every worker for its :class:`WorkerReport`."""


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


ToWorker = Step | Report | Shutdown


class WorkerReport(msgspec.Struct, frozen=True, tag="worker"):
    """A worker's own figures: its pool's page width and bytes, its weights, what it has
    written of adapters, and its collectives (calls and elements moved)."""

    rank: int
    page_width: int
    page_bytes: int
    weights: QuantizationReport
    adapter_elements: int
    collectives: dict[str, tuple[int, int, float]]  # kind: (calls, elements, seconds)


class StepDone(msgspec.Struct, frozen=True, tag="done"):
    """Worker 0's results of a step (every worker computes them; one sends them), and its
    counters so far: seconds spent in steps, and (calls, elements, seconds) of each kind of
    collective."""

    results: dict[str, ChunkResult]
    step_seconds: float = 0.0
    collectives: dict[str, tuple[int, int, float]] = {}


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    message: str


FromWorker = WorkerReport | StepDone | Failed


def _encode_hook(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous().cpu()
        return {
            "dtype": str(t.dtype),
            "shape": list(t.shape),
            "data": t.view(-1).view(torch.uint8).numpy().tobytes(),
        }
    if isinstance(obj, torch.Generator):
        return None  # each worker keeps its own (see the module's docstring)
    raise TypeError(f"cannot send {type(obj).__name__} to a worker")


def _decode_hook(kind: type, obj: Any) -> Any:
    if kind is torch.Tensor:
        dtype = _DTYPES[obj["dtype"]]
        data = bytearray(obj["data"])
        flat = (
            torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        )
        return flat.view(dtype).view(obj["shape"])
    if kind is torch.Generator:
        return None
    raise TypeError(f"cannot receive {kind.__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_hook)
_to_worker = msgspec.msgpack.Decoder(ToWorker, dec_hook=_decode_hook)  # type: ignore[arg-type]
_from_worker = msgspec.msgpack.Decoder(FromWorker, dec_hook=_decode_hook)  # type: ignore[arg-type]
_spec = msgspec.msgpack.Decoder(WorkerSpec)


def without_generators(output: SchedulerOutput) -> SchedulerOutput:
    """The step with no chunk's generator (they are not sent)."""
    if all(c.generator is None for c in output.chunks):
        return output
    chunks = [dataclasses.replace(c, generator=None) for c in output.chunks]
    return dataclasses.replace(output, chunks=chunks)


def frame(message: msgspec.Struct) -> bytes:
    """``message`` as one frame: its length, then its MessagePack."""
    payload = _encoder.encode(message)
    return _LENGTH.pack(len(payload)) + payload


def send(sock: socket.socket, message: msgspec.Struct) -> None:
    sock.sendall(frame(message))


def _receive_bytes(sock: socket.socket) -> bytes:
    header = _read_exactly(sock, _LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    return _read_exactly(sock, length)


def receive_spec(sock: socket.socket) -> WorkerSpec:
    return _spec.decode(_receive_bytes(sock))


def receive_to_worker(sock: socket.socket) -> Step | Report | Shutdown:
    message: Step | Report | Shutdown = _to_worker.decode(_receive_bytes(sock))
    return message


def receive_from_worker(sock: socket.socket) -> WorkerReport | StepDone | Failed:
    message: WorkerReport | StepDone | Failed = _from_worker.decode(_receive_bytes(sock))
    return message


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
