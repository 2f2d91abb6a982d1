"""One generation request in flight: its outputs as a stream of chunks, or one response.

Both forms read the same :class:`RequestGroup` and accumulate each choice's text from the
deltas, so a streamed request's deltas concatenate to exactly the text the non-streamed
request returns. A client that goes away aborts the group: while streaming, the response is
cancelled (Starlette watches for the disconnect) and :class:`EventStream` aborts on the way
out; while collecting, a watcher on the connection does the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.outputs import RequestOutput
from server.bridge import BridgeBase
from server.errors import ENGINE_UNAVAILABLE, APIError
from server.formatting import Choice, Json, Logprob, Renderer, usage
from server.request_group import RequestGroup


class Generation:
    """The choices of one request and how to render them.

    Args:
        bridge: where the group came from (to abort it).
        group: the engine requests, one per choice.
        renderer: completions or chat.
        n: choices per prompt (choice ``i`` answers prompt ``i // n``).
        echo: the prompt texts to put before each choice's text (completions ``echo``).
    """

    def __init__(
        self,
        bridge: BridgeBase,
        group: RequestGroup,
        renderer: Renderer,
        n: int,
        echo: list[str] | None = None,
    ) -> None:
        self.bridge = bridge
        self.group = group
        self.renderer = renderer
        self.n = n
        self.echo = echo
        self.choices = [Choice(i, i // n) for i in range(len(group.request_ids))]
        self._started = [False] * len(self.choices)

    def _apply(self, index: int, out: RequestOutput) -> tuple[str, list[Logprob]]:
        """Fold one output into its choice; returns the new text and log-prob entries."""
        choice = self.choices[index]
        text = out.delta
        entries: list[Logprob] = []
        if not self._started[index] and (out.num_prompt_tokens or out.finished):
            self._started[index] = True
            choice.num_prompt_tokens = out.num_prompt_tokens
            if self.echo is not None:
                text = self.echo[choice.prompt_index] + text
                if out.prompt_logprobs and out.prompt_token_ids:
                    first = Logprob(out.prompt_token_ids[0], None, [])
                    rest = [Logprob.of(e) for e in out.prompt_logprobs[1:] if e is not None]
                    entries.append(first)
                    entries.extend(rest)
        if out.new_logprobs:
            entries.extend(Logprob.of(e) for e in out.new_logprobs)
        choice.text += text
        choice.logprobs.extend(entries)
        choice.num_tokens = max(choice.num_tokens, out.num_output_tokens)
        # Fixed at the first admission; whichever outputs carry it.
        choice.num_cached_tokens = max(choice.num_cached_tokens, out.num_cached_tokens)
        if out.finished:
            choice.finish_reason = out.finish_reason or "abort"
            choice.error = out.error
            choice.error_code = out.error_code or "engine_error"
        return text, entries

    def abort(self) -> None:
        if self.group.unfinished:
            self.bridge.abort(self.group)

    # -- one response ---------------------------------------------------------------------

    async def _read_all(self) -> None:
        async for index, out in self.group:
            self._apply(index, out)

    async def collect(self, request: Request) -> Json | None:
        """The full response; None when the client disconnected first (nothing to send)."""
        reader = asyncio.ensure_future(self._read_all())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if reader not in done:
                return None
            reader.result()
        finally:
            reader.cancel()
            watcher.cancel()
            self.abort()
        failed = next((c for c in self.choices if c.error), None)
        if failed is not None and failed.error is not None:
            status = 503 if failed.error_code == ENGINE_UNAVAILABLE else 500
            raise APIError(status, failed.error_code, failed.error)
        return self.renderer.response(self.choices, usage(self.choices, self.n))

    # -- a stream -------------------------------------------------------------------------

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice per step, usage, then ``[DONE]``."""
        try:
            async for index, out in self.group:
                text, entries = self._apply(index, out)
                if out.error:
                    # Mid-stream the status is already 200: the error travels as an event.
                    code = out.error_code or "engine_error"
                    yield _sse(APIError(500, code, out.error).envelope())
                    break
                finish = self.choices[index].finish_reason if out.finished else None
                if text or entries or finish:
                    yield _sse(self.renderer.chunk(index, text, entries, finish))
            else:
                if include_usage:
                    yield _sse(self.renderer.usage_chunk(usage(self.choices, self.n)))
            yield "data: [DONE]\n\n"
        finally:
            self.abort()


class EventStream(StreamingResponse):
    """A server-sent-event response that aborts its generation however it ends."""

    def __init__(self, generation: Generation, include_usage: bool) -> None:
        super().__init__(
            generation.events(include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.abort()


def _sse(body: Json | dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
