"""The engine process's channel: every message round-trips, and bad streams are refused
(bad magic, a pickle, a wrong version, an oversized length, a truncated frame) before any
payload is decoded."""

from __future__ import annotations

import dataclasses
import pickle
import socket
import struct
import threading
from typing import Any

import msgspec
import pytest

from adapters.compose import ComposeSpec, Example
from adapters.merge import MergeSpec
from engine.outputs import (
    AdapterStatus,
    CollectiveStats,
    EngineStats,
    RequestOutput,
    TokenLogprob,
)
from engine.sampling_params import SamplingParams
from server.engine_loop import EngineCore
from server.engine_protocol import (
    HEADER,
    HEADER_BYTES,
    MAGIC,
    VERSION,
    Abort,
    AddRequests,
    CheckIntegrity,
    Compose,
    ComposeStatus,
    EngineInfo,
    EngineSpec,
    Export,
    FrameDecoder,
    GetStats,
    Heartbeat,
    Hello,
    ListAdapters,
    LoadLora,
    Merge,
    NewRequest,
    ProtocolError,
    Ready,
    RegisterMixture,
    RemoteError,
    Reply,
    StartupFailed,
    StepFailed,
    StepOutputs,
    UnloadLora,
    decode_to_api,
    decode_to_engine,
    decode_value,
    encode_value,
    frame,
)

PARAMS = SamplingParams(
    max_tokens=8, temperature=0.5, top_k=3, seed=7, stop=("x", "yz"), logprobs=2
)
OUTPUT = RequestOutput(
    request_id="req-1-0",
    delta="L",
    new_token_ids=[7],
    num_prompt_tokens=2,
    num_output_tokens=3,
    text="HEL",
    token_ids=[5, 6, 7],
    prompt_token_ids=[1, 2],
    finished=True,
    finish_reason="stop",
    error=None,
    error_code=None,
    queue_time=0.25,
    new_logprobs=[TokenLogprob(7, -0.3)],
    logprobs=[TokenLogprob(5, -0.1, [(5, -0.1), (9, -2.5)])],
    prompt_logprobs=[None, TokenLogprob(2, -1.0)],
    num_cached_tokens=1,
)
SPEC = EngineSpec(
    model_dir=None,
    engine_args={"dtype": "auto", "num_pages": 240, "quantization": None, "max_num_seqs": 8},
    seed=3,
    lora_modules=[("upper", "/adapters/upper")],
    log_level="WARNING",
)
COMPOSE = ComposeSpec("mix", ("upper", "swapcase"), (Example("ab=", "AB"),), max_steps=5)

# Every option of a request at a value other than its default: a field the channel dropped
# or renamed would arrive as its default.
EVERY_PARAM = SamplingParams(
    max_tokens=9,
    temperature=0.3,
    top_p=0.8,
    top_k=4,
    seed=5,
    stop=("x", "yz"),
    stop_token_ids=(3, 4),
    ignore_eos=True,
    min_tokens=2,
    skip_special_tokens=False,
    logprobs=1,
    prompt_logprobs=3,
    presence_penalty=-0.5,
    frequency_penalty=1.5,
)
EVERY_OPTION = NewRequest("req-9-0", [1, 2, 3], EVERY_PARAM, "upper", priority=-3, user="alice")

TO_ENGINE: list[Any] = [
    Hello("secret", SPEC),
    AddRequests(1, [NewRequest("req-1-0", [1, 2, 3], PARAMS, "upper")]),
    AddRequests(2, [NewRequest("req-2-0", [4], SamplingParams(), None)]),
    AddRequests(13, [EVERY_OPTION]),
    Abort(["req-1-0", "req-2-0"]),
    LoadLora(3, "upper", "/adapters/upper", True),
    UnloadLora(4, "upper"),
    Merge(5, "m", MergeSpec(("upper", "swapcase"), (1.0, 0.5), "ties", density=0.5), "/root"),
    RegisterMixture(6, "mix", [("upper", 1.0), ("reverse", -0.5)]),
    Compose(7, COMPOSE, False, None, 32, 200, 2),
    ComposeStatus(8, "compose-abc"),
    Export(9, "upper", "/exports/upper", "bfloat16", "nf4"),
    ListAdapters(10),
    GetStats(11),
    CheckIntegrity(12),
]
TO_API: list[Any] = [
    Ready(EngineInfo(42, "/model", "auto", 128, 32, ["upper", "swapcase"])),
    StartupFailed("adapter upper: bad rank"),
    StepOutputs([OUTPUT, RequestOutput("r", "", [4], 1, 1, False)]),
    StepFailed("the engine failed to run a step"),
    Heartbeat(17),
    Reply(1),
    Reply(5, encode_value(12)),
    Reply(6, error=RemoteError("adapter", "no such adapter", "model_not_found")),
    Reply(
        7,
        error=RemoteError("api", "busy", "too_many", 429, None, {"Retry-After": "5"}),
    ),
]


@pytest.mark.parametrize("message", TO_ENGINE, ids=lambda m: type(m).__name__)
def test_messages_to_the_engine_round_trip(message: Any) -> None:
    (payload,) = FrameDecoder().feed(frame(message))
    assert decode_to_engine(payload) == message


@pytest.mark.parametrize("message", TO_API, ids=lambda m: type(m).__name__)
def test_messages_to_the_api_round_trip(message: Any) -> None:
    (payload,) = FrameDecoder().feed(frame(message))
    decoded = decode_to_api(payload)
    if isinstance(message, Reply):  # Raw compares by identity
        assert isinstance(decoded, Reply)
        assert (decoded.call_id, decoded.error) == (message.call_id, message.error)
        assert bytes(decoded.result) == bytes(message.result)
    else:
        assert decoded == message


def test_engine_dataclasses_keep_their_types() -> None:
    (payload,) = FrameDecoder().feed(frame(StepOutputs([OUTPUT])))
    decoded = decode_to_api(payload)
    assert isinstance(decoded, StepOutputs)
    out = decoded.outputs[0]
    assert isinstance(out, RequestOutput) and out == OUTPUT
    assert out.num_cached_tokens == 1  # what usage.prompt_tokens_details reports
    assert out.logprobs is not None and isinstance(out.logprobs[0], TokenLogprob)
    assert out.logprobs[0].top == [(5, -0.1), (9, -2.5)]
    (payload,) = FrameDecoder().feed(frame(TO_ENGINE[1]))
    request = decode_to_engine(payload)
    assert isinstance(request, AddRequests)
    assert request.requests[0].params == PARAMS
    assert isinstance(request.requests[0].params.stop, tuple)


def test_a_request_with_every_option_set_round_trips() -> None:
    defaults = SamplingParams()
    unchanged = [
        f.name
        for f in dataclasses.fields(SamplingParams)
        if getattr(EVERY_PARAM, f.name) == getattr(defaults, f.name)
    ]
    assert unchanged == [], "give every option a non-default value here"
    optional = [f for f in msgspec.structs.fields(NewRequest) if f.required is False]
    assert [f.name for f in optional if getattr(EVERY_OPTION, f.name) == f.default] == []
    (payload,) = FrameDecoder().feed(frame(AddRequests(1, [EVERY_OPTION])))
    decoded = decode_to_engine(payload)
    assert isinstance(decoded, AddRequests)
    assert decoded.requests == [EVERY_OPTION]
    assert isinstance(decoded.requests[0].params, SamplingParams)


class _IdleEngine:
    """What the engine process's loop asks of an idle engine; records each add_request."""

    num_steps = 0

    def __init__(self) -> None:
        self.added: list[tuple[Any, SamplingParams, dict[str, Any]]] = []

    def check_workers(self) -> None:
        pass

    def has_unfinished(self) -> bool:
        return False

    def add_request(self, prompt: Any, params: SamplingParams, **kwargs: Any) -> str:
        self.added.append((prompt, params, kwargs))
        return str(kwargs["request_id"])

    def abort(self, request_id: str) -> None:
        raise AssertionError(f"nothing should be aborted ({request_id})")


def test_the_engine_process_hands_every_option_to_add_request() -> None:
    engine = _IdleEngine()
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    core = EngineCore(engine, theirs)  # type: ignore[arg-type]
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(core.run()))
    thread.start()
    try:
        ours.sendall(frame(AddRequests(1, [EVERY_OPTION])))
        decoder = FrameDecoder()
        replies: list[Reply] = []
        while not replies:
            for payload in decoder.feed(ours.recv(1 << 16)):
                message = decode_to_api(payload)
                if isinstance(message, Reply):
                    replies.append(message)
    finally:
        ours.close()
        thread.join(10)
    assert not thread.is_alive() and exit_codes == [0]
    assert (replies[0].call_id, replies[0].error) == (1, None)
    options = {"lora": "upper", "priority": -3, "user": "alice"}
    assert engine.added == [
        ([1, 2, 3], EVERY_PARAM, {"request_id": "req-9-0", "detokenize": False, **options})
    ]


def _value(type_name: str, i: int) -> Any:
    if type_name == "dict[str, CollectiveStats]":  # a split model's collectives, by kind
        return {"all_reduce": CollectiveStats(i, 10 * i, i + 0.5)}
    if type_name.startswith("dict"):  # by adapter name ("" = the base model)
        return {"": i, "upper": i + 1}
    if type_name == "list[AdapterStatus]":  # the status route's adapters
        return [AdapterStatus("upper", "dora", 2, True, "pool", 8, 40 + i, 1, 2)]
    if type_name.startswith("list"):  # adapter names
        return ["upper", f"a{i}"]
    return i + 0.5 if "float" in type_name else i


def test_reply_values_decode_as_the_caller_expects() -> None:
    fields = dataclasses.fields(EngineStats)
    stats = EngineStats(**{f.name: _value(str(f.type), i) for i, f in enumerate(fields)})
    assert decode_value(encode_value(stats), EngineStats) == stats
    assert decode_value(encode_value(["a", "b"]), list[str]) == ["a", "b"]
    versions = {"upper": 3, "swapcase": 1}  # ListAdapters' and LoadLora's replies
    assert decode_value(encode_value(versions), dict[str, int]) == versions
    assert decode_value(encode_value(2), int) == 2
    assert decode_value(encode_value(None), type(None)) is None
    with pytest.raises(ProtocolError):
        decode_value(encode_value("twelve"), int)


def test_sampling_params_are_validated_on_decoding() -> None:
    bad = msgspec.msgpack.encode(
        {
            "type": "add",
            "call_id": 1,
            "requests": [{"request_id": "r", "prompt_token_ids": [1], "params": {"max_tokens": 0}}],
        }
    )
    with pytest.raises(ProtocolError, match="max_tokens"):
        decode_to_engine(bad)


def test_frames_split_anywhere_and_several_per_read() -> None:
    stream = b"".join(frame(m) for m in TO_ENGINE)
    decoder = FrameDecoder()
    payloads = []
    for i in range(len(stream)):  # one byte at a time
        payloads += decoder.feed(stream[i : i + 1])
    assert [decode_to_engine(p) for p in payloads] == TO_ENGINE
    assert decoder.pending == 0
    decoder.close()
    assert len(FrameDecoder().feed(stream)) == len(TO_ENGINE)


def test_truncated_frames_wait_then_fail_at_the_end() -> None:
    data = frame(Heartbeat(1))
    for cut in (1, HEADER_BYTES - 1, HEADER_BYTES, len(data) - 1):
        decoder = FrameDecoder()
        assert decoder.feed(data[:cut]) == []
        assert decoder.pending == cut
        with pytest.raises(ProtocolError, match="inside a frame"):
            decoder.close()


class _Marker:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


def test_a_pickle_is_refused_on_its_first_byte() -> None:
    data = pickle.dumps(_Marker())
    assert data[0] == 0x80
    with pytest.raises(ProtocolError, match="bad magic"):
        FrameDecoder().feed(data[:1])
    with pytest.raises(ProtocolError, match="bad magic"):
        FrameDecoder().feed(data)


@pytest.mark.parametrize(
    "header",
    [
        b"LRSX" + bytes(8),
        b"GET / HTTP/1.1\r\n",
        HEADER.pack(MAGIC, VERSION + 1, 0, 0, 4),
        HEADER.pack(MAGIC, VERSION, 1, 0, 4),
    ],
    ids=["magic", "http", "version", "flags"],
)
def test_bad_headers_are_refused(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(header + b"\x90" * 4)


def test_oversized_lengths_are_refused_before_the_payload() -> None:
    decoder = FrameDecoder(max_bytes=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed(HEADER.pack(MAGIC, VERSION, 0, 0, 1025))
    with pytest.raises(ProtocolError, match="exceeds"):  # the default limit, u32 max
        FrameDecoder().feed(MAGIC + struct.pack(">BBHI", VERSION, 0, 0, 2**32 - 1))
    assert len(FrameDecoder(max_bytes=1024).feed(frame(Heartbeat(1)))) == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never used in MessagePack
        msgspec.msgpack.encode({"type": "no-such-message"}),
        msgspec.msgpack.encode({"type": "abort", "request_ids": "not a list"}),
        msgspec.msgpack.encode([1, 2, 3]),
    ],
    ids=["not-msgpack", "unknown-tag", "wrong-type", "not-a-struct"],
)
def test_payloads_outside_the_union_are_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_to_engine(payload)
    with pytest.raises(ProtocolError):
        decode_to_api(payload)


def test_each_direction_decodes_only_its_own_messages() -> None:
    with pytest.raises(ProtocolError):
        decode_to_engine(msgspec.msgpack.encode(Heartbeat(1)))
    with pytest.raises(ProtocolError):
        decode_to_api(msgspec.msgpack.encode(Abort(["r"])))
