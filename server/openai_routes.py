"""The OpenAI routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Each generation route validates its body completely (the models in
:mod:`server.request_models`), queues one engine request per choice through the bridge (all
or none), then either streams the outputs or collects them into one response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from adapters.errors import AdapterError
from engine.sampling_params import SamplingParams
from server.body import read_body
from server.errors import APIError, from_adapter_error, from_engine_value_error
from server.formatting import ChatRenderer, CompletionRenderer, Renderer
from server.generation import EventStream, Generation
from server.request_models import (
    ChatCompletionRequest,
    CompletionRequest,
    Prompt,
    SamplingFields,
    parse_body,
)
from server.state import ServerState, server_state

_INLINE_TOKENIZE_CHARS = 4096  # longer prompts are tokenized off the event loop


openai_router = APIRouter()


@openai_router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = server_state(request)
    config = state.config
    body = parse_body(await read_body(request, config.max_request_bytes), CompletionRequest)
    body.check()
    prompts = body.prompts()
    _check_choices(len(prompts) * body.n, config.max_choices)
    ids = await _tokenize(state, prompts)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    jobs = [
        (p, body.sampling_params(max_tokens, i, body.logprobs, prompt_logprobs))
        for p in ids
        for i in range(body.n)
    ]
    renderer = CompletionRenderer(body.model, state.token_text, body.logprobs is not None)
    echo = [_prompt_text(state, p) for p in prompts] if body.echo else None
    return await _generate(request, state, body, jobs, renderer, "prompt", echo)


@openai_router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = server_state(request)
    config = state.config
    body = parse_body(await read_body(request, config.max_request_bytes), ChatCompletionRequest)
    body.check()
    _check_choices(body.n, config.max_choices)
    ids = _render_chat(state, body)
    max_tokens = body.max_new_tokens
    if max_tokens is None:  # fill the context, as the OpenAI API does
        info = (await state.handle.adapters()).get(body.model)
        virtual = 0 if info is None else info.num_virtual_tokens  # prompt/prefix tuning
        max_tokens = state.handle.max_model_len - virtual - len(ids)
        if max_tokens < 1:
            beside = f" beside the adapter's {virtual} virtual tokens" if virtual else ""
            raise APIError(
                400,
                "context_length_exceeded",
                f"the messages ({len(ids)} tokens){beside} fill the context length",
                "messages",
            )
    top = (body.top_logprobs or 0) if body.logprobs else None
    jobs = [(ids, body.sampling_params(max_tokens, i, top, None)) for i in range(body.n)]
    renderer = ChatRenderer(body.model, state.token_text, body.logprobs)
    return await _generate(request, state, body, jobs, renderer, "messages", None)


@openai_router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The base (``parent: null``) and every adapter, with the version it serves,
    whether it is pinned, and (prompt and prefix tuning) the virtual tokens each of its
    requests takes of the context."""
    state = server_state(request)
    adapters = {
        name: {"version": info.version, "pinned": info.pinned, "kind": info.kind}
        | ({"num_virtual_tokens": info.num_virtual_tokens} if info.num_virtual_tokens else {})
        for name, info in (await state.handle.adapters()).items()
    }
    return model_list(state.config.model_name, state.handle.max_model_len, adapters)


def model_list(
    base: str, max_model_len: int, adapters: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``/v1/models``'s body: the base (``parent: null``), then each adapter with its fields
    (version, pinned, kind, num_virtual_tokens); temporary adapters (``_`` names,
    compositions') stay unlisted."""
    created = int(time.time())

    def card(name: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "loraserve",
            "root": name,
            "parent": parent,
            "max_model_len": max_model_len,
        }

    data = [card(base, None)]
    data += [card(n, base) | fields for n, fields in adapters.items() if not n.startswith("_")]
    return {"object": "list", "data": data}


async def _generate(
    request: Request,
    state: ServerState,
    body: SamplingFields,
    jobs: Sequence[tuple[Prompt, SamplingParams]],
    renderer: Renderer,
    prompt_param: str,
    echo: list[str] | None,
) -> Response:
    """Queue the jobs, then stream or collect their outputs."""
    body.check_priority(state.handle.scheduling_policy)
    try:
        group = await state.bridge.submit_async(
            jobs, state.lora_for(body.model), priority=body.priority, user=body.client_user
        )
    except AdapterError as e:
        raise from_adapter_error(e, "model") from None
    except APIError as e:
        state.metrics.rejected.labels(str(e.status)).inc()
        raise
    except ValueError as e:
        raise from_engine_value_error(e, prompt_param) from None
    generation = Generation(state.bridge, group, renderer, body.n, echo)
    if body.stream:
        return EventStream(generation, body.include_usage)
    response = await generation.collect(request)
    if response is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    return JSONResponse(response)


def _check_choices(num_choices: int, limit: int) -> None:
    if num_choices > limit:
        raise APIError(
            400, "invalid_value", f"at most {limit} choices (prompts × n) per request", "n"
        )


async def _tokenize(state: ServerState, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids of every prompt, as the engine would make them (special tokens added).

    Long texts are tokenized in a worker thread so that the event loop keeps streaming.
    """
    tokenizer = state.handle.tokenizer

    def run() -> list[list[int]]:
        return [list(tokenizer(p).input_ids) if isinstance(p, str) else p for p in prompts]

    num_chars = sum(len(p) for p in prompts if isinstance(p, str))
    return run() if num_chars < _INLINE_TOKENIZE_CHARS else await asyncio.to_thread(run)


def _prompt_text(state: ServerState, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return str(state.handle.tokenizer.decode(prompt, skip_special_tokens=True))


def _render_chat(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    """The conversation through the tokenizer's chat template, as token ids."""
    tokenizer = state.handle.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "chat_template_missing", "the model has no chat template", "messages")
    try:
        text = tokenizer.apply_chat_template(
            body.conversation(), tokenize=False, add_generation_prompt=body.add_generation_prompt
        )
    except Exception as e:  # the template's own checks (role order, ...) raise
        message = str(e).splitlines()[0][:200] if str(e) else "the template refused them"
        raise APIError(400, "invalid_messages", f"messages: {message}", "messages") from None
    # The template writes its own special tokens (BOS...): add none a second time.
    ids = list(tokenizer(str(text), add_special_tokens=False).input_ids)
    if not ids:
        raise APIError(400, "invalid_prompt", "the rendered conversation is empty", "messages")
    return ids
