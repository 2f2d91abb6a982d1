"""What the engine reports about a request after each step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestOutput:
    """A request's progress after one engine step.

    Attributes:
        request_id: the id given to ``add_request``.
        text: the whole generated text released so far (stop strings excluded).
        delta: the text released by this step (what a stream sends).
        token_ids: every generated token id so far.
        prompt_token_ids: the prompt as the engine saw it.
        finished: whether this is the request's last output.
        finish_reason: "stop", "length" or "abort" once finished, else None.
        error: why the engine aborted the request (e.g. its adapter failed to load).
    """

    request_id: str
    text: str
    delta: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
