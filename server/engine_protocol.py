"""The channel between the API process and the engine process: messages, frames, codec.

Every frame is a fixed 12-byte header followed by one MessagePack payload::

    magic b"LRSV" | version (1 byte) | flags (1 byte, 0) | reserved (2 bytes, 0) | length (u32, BE)

The payload is one msgspec Struct of a closed, tagged union: :data:`ToEngine` from the API
process, :data:`ToApi` back. Nothing here can run code while decoding: MessagePack holds
only plain values and msgspec builds only the types named in the unions (and the engine's
own dataclasses they contain: :class:`~engine.sampling_params.SamplingParams`,
:class:`~engine.outputs.RequestOutput`, ...). Pickle is never used: a frame that does not
start with the magic (a pickle stream starts with 0x80) is refused on its first byte, before
anything is decoded, and the connection is closed; so are a wrong version, a length past
:data:`MAX_FRAME_BYTES` and a payload that does not decode into the expected union.

Engine dataclasses travel through msgspec's dataclass support (a map of their fields), so a
field added to :class:`~engine.outputs.RequestOutput` crosses without a change here.
"""

from __future__ import annotations

import struct
from typing import Any, Literal, TypeVar

import msgspec

from adapters.compose import ComposeSpec
from adapters.merge import MergeSpec
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

MAGIC = b"LRSV"
VERSION = 1
HEADER = struct.Struct(">4sBBHI")
HEADER_BYTES = HEADER.size  # 12
MAX_FRAME_BYTES = 256 << 20  # one step's outputs of a full batch stay far below this

T = TypeVar("T")


class ProtocolError(Exception):
    """A frame or payload that breaks the protocol; the connection must be closed."""


# -- API process → engine process ---------------------------------------------------------


class EngineSpec(msgspec.Struct, frozen=True):
    """What the engine process builds: ``server.engine_args`` flags (by their argparse
    destinations), the seed, the adapters to load at startup (``pinned_lora_modules``: the
    names among them loaded pinned), the log level, and adapters the default pool is sized
    for without loading them (``sized_for``: a Ray replica's, which loads on demand)."""

    model_dir: str | None
    engine_args: dict[str, Any]  # plain values, whatever flags engine_args defines
    seed: int = 0
    lora_modules: list[tuple[str, str]] = []
    log_level: str = "INFO"
    pinned_lora_modules: list[str] = []
    sized_for: list[tuple[str, str]] = []


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """The first frame on a connection: the token from the environment, then the spec."""

    token: str
    spec: EngineSpec


class NewRequest(msgspec.Struct, frozen=True):
    """One engine request: the prompt tokenized by the API process; ``priority`` and
    ``user`` as ``LLMEngine.add_request`` takes them."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: str | None = None
    priority: int = 0
    user: str | None = None


class AddRequests(msgspec.Struct, frozen=True, tag="add"):
    """Queue every request or none (the reply carries the refusal)."""

    call_id: int
    requests: list[NewRequest]


class Abort(msgspec.Struct, frozen=True, tag="abort"):
    request_ids: list[str]


class LoadLora(msgspec.Struct, frozen=True, tag="load_lora"):
    """Replies with the version now served under ``name`` (an int)."""

    call_id: int
    name: str
    path: str
    replace: bool = False
    pinned: bool = False


class UnloadLora(msgspec.Struct, frozen=True, tag="unload_lora"):
    call_id: int
    name: str


class Merge(msgspec.Struct, frozen=True, tag="merge"):
    """``POST /v1/adapters/merge``; replies with the served rank (an int)."""

    call_id: int
    name: str
    spec: MergeSpec
    save_to: str | None = None


class RegisterMixture(msgspec.Struct, frozen=True, tag="register_mixture"):
    call_id: int
    name: str
    components: list[tuple[str, float]]
    replace: bool = False


class Compose(msgspec.Struct, frozen=True, tag="compose"):
    """Start a composition; replies with the job's snapshot. ``default_candidates``: the
    spec names none, use every loaded adapter."""

    call_id: int
    spec: ComposeSpec
    default_candidates: bool
    save_dir: str | None
    max_candidates: int
    max_steps: int
    max_jobs: int


class ComposeStatus(msgspec.Struct, frozen=True, tag="compose_status"):
    """Replies with the job's snapshot, or None for an unknown id."""

    call_id: int
    job_id: str


class ListCompositions(msgspec.Struct, frozen=True, tag="list_compositions"):
    """Replies with every kept composition job's snapshot, newest first."""

    call_id: int


class Export(msgspec.Struct, frozen=True, tag="export"):
    call_id: int
    name: str
    out: str
    dtype: str
    quantization: str = "none"


class ListAdapters(msgspec.Struct, frozen=True, tag="list_adapters"):
    """Replies with every registered name (temporary ``_`` ones included) and its
    :class:`~server.adapter_ops.AdapterInfo` (version, pinned), as a map."""

    call_id: int


class GetStats(msgspec.Struct, frozen=True, tag="stats"):
    """Replies with an :class:`~engine.outputs.EngineStats`."""

    call_id: int


class CheckIntegrity(msgspec.Struct, frozen=True, tag="check_integrity"):
    """Between two steps: the pool's invariants (tests); replies None or an error."""

    call_id: int


ToEngine = (
    Hello
    | AddRequests
    | Abort
    | LoadLora
    | UnloadLora
    | Merge
    | RegisterMixture
    | Compose
    | ComposeStatus
    | ListCompositions
    | Export
    | ListAdapters
    | GetStats
    | CheckIntegrity
)
Call = (
    AddRequests
    | LoadLora
    | UnloadLora
    | Merge
    | RegisterMixture
    | Compose
    | ComposeStatus
    | ListCompositions
    | Export
    | ListAdapters
    | GetStats
    | CheckIntegrity
)


# -- engine process → API process ---------------------------------------------------------


class EngineInfo(msgspec.Struct, frozen=True):
    """What the API process needs to know of the engine it talks to."""

    pid: int
    model_dir: str
    load_format: str
    max_model_len: int
    max_num_seqs: int
    adapters: list[str]
    scheduling_policy: str = "fair"  # the API process refuses priorities the policy ignores
    plan: dict[str, Any] | None = None  # the engine's plan (engine.plan.Plan.to_json)


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    info: EngineInfo


class StartupFailed(msgspec.Struct, frozen=True, tag="startup_failed"):
    message: str


class StepOutputs(msgspec.Struct, frozen=True, tag="outputs"):
    """One step's outputs for the API's requests (at most one such frame per step)."""

    outputs: list[RequestOutput]


class StepFailed(msgspec.Struct, frozen=True, tag="step_failed"):
    """A step raised outside the engine's own containment; in-flight requests are lost."""

    message: str


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat"):
    """Sent when no other frame went out for a second: the engine loop is alive."""

    num_steps: int


class RemoteError(msgspec.Struct, frozen=True):
    """A call's failure, rebuilt as the same exception type on the API side.

    ``kind``: "api" (an HTTP error: status, code, message, param, headers), "adapter" (an
    ``AdapterError``: code, message), "value" (a ``ValueError``: message) or "internal"
    (anything else; the message stays in the logs of both processes, never in a response).
    """

    kind: Literal["api", "adapter", "value", "internal"]
    message: str
    code: str = ""
    status: int = 500
    param: str | None = None
    headers: dict[str, str] = {}


class Reply(msgspec.Struct, frozen=True, tag="reply"):
    """The answer to the call ``call_id``: ``result`` (MessagePack, decoded by the caller
    into the type it expects) or ``error``."""

    call_id: int
    result: msgspec.Raw = msgspec.Raw(b"\xc0")  # nil
    error: RemoteError | None = None


ToApi = Ready | StartupFailed | StepOutputs | StepFailed | Heartbeat | Reply


# -- frames -------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_to_api = msgspec.msgpack.Decoder(ToApi)


def encode_value(value: Any) -> msgspec.Raw:
    """A call's result, for :attr:`Reply.result`."""
    return msgspec.Raw(_encoder.encode(value))


def decode_value(raw: msgspec.Raw, type_: type[T]) -> T:
    """A :attr:`Reply.result` as ``type_`` (``ProtocolError`` if it is not one)."""
    try:
        return msgspec.msgpack.decode(raw, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"bad reply value: {e}") from None


def frame(message: msgspec.Struct) -> bytes:
    """The message as one frame, header included."""
    payload = _encoder.encode(message)
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"a {len(payload)}-byte message exceeds the frame limit")
    return HEADER.pack(MAGIC, VERSION, 0, 0, len(payload)) + payload


def decode_to_engine(payload: bytes) -> ToEngine:
    try:
        message: ToEngine = _to_engine.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"bad message: {e}") from None
    return message


def decode_to_api(payload: bytes) -> ToApi:
    try:
        message: ToApi = _to_api.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"bad message: {e}") from None
    return message


def parse_header(header: bytes, max_bytes: int = MAX_FRAME_BYTES) -> int:
    """The payload length of a complete header (``ProtocolError`` for a bad one)."""
    magic, version, flags, reserved, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError("not a loraserve frame (bad magic)")
    if version != VERSION or flags or reserved:
        raise ProtocolError(f"unsupported frame version {version}")
    if length > max_bytes:
        raise ProtocolError(f"a {length}-byte frame exceeds the limit of {max_bytes}")
    return int(length)


class FrameDecoder:
    """Splits a byte stream into payloads; refuses a bad stream as early as it can.

    The magic is checked on every byte that has arrived, so a stream that starts with
    anything else (a pickle's 0x80) is refused on its first byte; the header, before any
    payload byte is kept; the payload is returned undecoded (:func:`decode_to_engine`).
    """

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; returns the payloads they complete, in order."""
        self._buffer += data
        payloads = []
        while self._buffer:
            start = bytes(self._buffer[: len(MAGIC)])
            if not MAGIC.startswith(start):
                raise ProtocolError("not a loraserve frame (bad magic)")
            if len(self._buffer) < HEADER_BYTES:
                break
            length = parse_header(bytes(self._buffer[:HEADER_BYTES]), self.max_bytes)
            end = HEADER_BYTES + length
            if len(self._buffer) < end:
                break
            payloads.append(bytes(self._buffer[HEADER_BYTES:end]))
            del self._buffer[:end]
        return payloads

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)

    def close(self) -> None:
        """The stream ended: ``ProtocolError`` if it ended inside a frame."""
        if self._buffer:
            raise ProtocolError(f"the stream ended inside a frame ({len(self._buffer)} bytes)")
