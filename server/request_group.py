"""The engine requests behind one HTTP request, read as one asynchronous stream."""

from __future__ import annotations

import asyncio

from engine.outputs import RequestOutput


class RequestGroup:
    """The engine requests behind one HTTP request (one per choice), read as one stream.

    Iterating yields ``(choice index, output)`` until every choice has finished.
    """

    def __init__(self, request_ids: list[str], arrival: float) -> None:
        self.request_ids = request_ids
        self.arrival = arrival
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self.unfinished = set(request_ids)
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.last_token_time: dict[str, float] = {}  # per request: when its last token came
        self.num_tokens: dict[str, int] = {}  # per request: tokens seen so far

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.unfinished and self.queue.empty():
            raise StopAsyncIteration
        output = await self.queue.get()
        if output.finished:
            self.unfinished.discard(output.request_id)
        return self.index[output.request_id], output


def final_output(
    request_id: str, reason: str, error: str | None, error_code: str | None = None
) -> RequestOutput:
    """A last output the engine never sent (it failed, or lost the request)."""
    return RequestOutput(
        request_id=request_id,
        delta="",
        new_token_ids=[],
        num_prompt_tokens=0,
        num_output_tokens=0,
        finished=True,
        finish_reason=reason,
        error=error,
        error_code=error_code,
    )
