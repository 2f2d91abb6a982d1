"""Request bodies of the OpenAI (and vLLM) routes, validated before any work is queued.

Models are strict (no "5" for 5, no 1.0 for an int) and ignore unknown fields, as the OpenAI
API does. Field errors become a 400 whose ``param`` names the field; cross-field rules are
checked by each model's ``check()``, which raises :class:`APIError` itself. (The messages
between the API process and the engine process are :mod:`server.engine_protocol`'s.)
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.sampling_params import SamplingParams
from server.errors import APIError

MAX_LOGPROBS = 5  # completions ``logprobs`` and chat ``top_logprobs``
MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_NAME_CHARS = 256
# ``priority`` (vLLM's extension; lower runs first) stays within 32 bits.
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1
# Counts and token ids: within 32 bits, so every integer crosses to the engine process (and
# into torch) as what it is; larger ones mean nothing here.
MAX_COUNT = 2**31 - 1
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]

Prompt = str | list[int]  # one prompt: text, or token ids
ModelT = TypeVar("ModelT", bound=BaseModel)


class _Strict(BaseModel):
    # JSON's NaN and Infinity (which Python's parser takes) are no number a field accepts.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """What completions and chat share: the model, sampling, stopping, streaming."""

    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_COUNT)] = -1
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Who asks (OpenAI's field): the fair policy's client under ``--fairness-key user``, so
    # also a metric label; "" counts as no user.
    user: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    # vLLM's extensions.
    priority: Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY)] = 0  # lower runs first
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: Annotated[list[Count], Field(max_length=64)] = []
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not 0 < len(s) <= MAX_STOP_CHARS for s in strings):
            raise ValueError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_common(self, max_tokens: int | None) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "invalid_value", "stream_options is only allowed with stream", "stream_options"
            )
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise APIError(400, "invalid_value", "min_tokens exceeds max_tokens", "min_tokens")

    def check_priority(self, policy: str) -> None:
        """A priority means something only to the "priority" policy: refuse it (400
        ``param: priority``) under another, before anything is queued."""
        if self.priority != 0 and policy != "priority":
            raise APIError(
                400,
                "invalid_value",
                f"priority {self.priority} needs --scheduling-policy priority; this server "
                f"schedules by {policy}",
                "priority",
            )

    @property
    def client_user(self) -> str | None:
        """``user`` as the engine takes it (None when absent or empty)."""
        return self.user or None

    def sampling_params(
        self, max_tokens: int, choice: int, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """The engine's parameters for choice number ``choice`` of this request.

        Choices of a seeded request get seeds ``seed + choice`` so that they differ.
        """
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k,
                seed=seed,
                stop=self.stop_strings,
                stop_token_ids=tuple(self.stop_token_ids),
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                skip_special_tokens=self.skip_special_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
            )
        except ValueError as e:
            raise APIError(400, "invalid_value", str(e)) from None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    # Token ids' sign is checked by prompts(), their range against the vocabulary before
    # anything is queued (both 400 invalid_prompt).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None

    def check(self) -> None:
        self._check_common(self.max_tokens)
        _unsupported(self.suffix is not None, "suffix")
        _unsupported(self.best_of not in (None, 1, self.n), "best_of")
        _unsupported(bool(self.logit_bias), "logit_bias")

    def prompts(self) -> list[Prompt]:
        """The prompts as a list of text or token ids; 400 ``param: prompt`` when empty."""
        p = self.prompt
        prompts: list[Prompt]
        if isinstance(p, str):
            prompts = [p]
        elif not p:
            raise APIError(400, "invalid_prompt", "the prompt is empty", "prompt")
        elif isinstance(p[0], int):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        for one in prompts:
            if len(one) == 0:
                raise APIError(400, "invalid_prompt", "the prompt is empty", "prompt")
            if isinstance(one, list) and any(t < 0 for t in one):
                raise APIError(400, "invalid_prompt", "token ids must be non-negative", "prompt")
            if isinstance(one, list) and any(t > MAX_COUNT for t in one):
                raise APIError(400, "invalid_prompt", "a token id is out of range", "prompt")
        return prompts


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``; None: fill the context."""
        return self.max_completion_tokens or self.max_tokens

    def check(self) -> None:
        self._check_common(self.max_new_tokens)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400, "invalid_value", "top_logprobs requires logprobs: true", "top_logprobs"
            )
        _unsupported(bool(self.logit_bias), "logit_bias")
        _unsupported(bool(self.tools), "tools")

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


_ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"


class LoadLoraRequest(_Strict):
    """``POST /v1/load_lora_adapter`` (vLLM's route and fields).

    ``replace`` and vLLM's spelling ``load_inplace`` mean the same: a name already loaded
    gets the new weights as its next version (without either, it is a 409). ``pinned``
    keeps the adapter in the page pool through any churn; the engine refuses a pin
    (``pin_refused``) that would leave the pool too small for a request.
    """

    lora_name: Annotated[str, Field(pattern=_ADAPTER_NAME)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]
    replace: bool = False
    load_inplace: bool = False
    pinned: bool = False  # kept in the pool until unloaded (or replaced unpinned)

    @property
    def in_place(self) -> bool:
        return self.replace or self.load_inplace


class UnloadLoraRequest(_Strict):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class MergeAdaptersRequest(_Strict):
    """``POST /v1/adapters/merge``: PEFT's ``add_weighted_adapter`` arguments, or a mixture."""

    name: Annotated[str, Field(pattern=_ADAPTER_NAME)]
    adapters: Annotated[list[str], Field(min_length=1, max_length=64)]
    weights: Annotated[list[float], Field(min_length=1, max_length=64)]
    combination_type: str = "svd"
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: Annotated[int, Field(ge=1, le=4096)] | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    seed: Seed = 0
    save: bool = False


class ComposeExample(_Strict):
    prompt: Annotated[str, Field(min_length=1)]
    completion: Annotated[str, Field(min_length=1)]


class ComposeRequest(_Strict):
    """``POST /v1/adapters/compose``: a LoRAHub composition job."""

    name: Annotated[str, Field(pattern=_ADAPTER_NAME)]
    candidates: list[str] | None = None
    examples: Annotated[list[ComposeExample], Field(min_length=1, max_length=64)]
    method: str = "lorahub"
    max_steps: Annotated[int, Field(ge=1, le=MAX_COUNT)] = 40  # --max-compose-steps caps it
    l1: Annotated[float, Field(ge=0.0)] = 0.05
    bounds: Annotated[list[float], Field(min_length=2, max_length=2)] = [-1.5, 1.5]
    seed: Seed = 0
    save: bool = False


class ExportRequest(_Strict):
    """``POST /v1/adapters/{name}/export``: the base with the adapter merged in."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "nf4"] = "none"
    out: Annotated[str, Field(pattern=_ADAPTER_NAME)] | None = None


def _unsupported(present: bool, param: str) -> None:
    if present:
        raise APIError(400, "unsupported_parameter", f"{param} is not supported", param)


def parse_body(raw: bytes, model: type[ModelT]) -> ModelT:
    """Parse a JSON body into ``model``; every failure is a 400 with a short message."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, or nesting too deep
        raise APIError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "invalid_json", "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        loc = first.get("loc") or ()
        param = str(loc[0]) if loc else None
        message = first.get("msg", "invalid value")
        message = f"{param}: {message}" if param else message
        raise APIError(400, "invalid_value", message[:300], param) from None
