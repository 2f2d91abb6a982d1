"""A prompt-tuned adapter through the HTTP API: PEFT's text, usage counting the request's own
prompt tokens (not the adapter's virtual ones), echo without placeholders, and the virtual
tokens counted against the context."""

from __future__ import annotations

from pathlib import Path

from engine.config import DEMO_DIR
from tests.peft_kinds import make_kind_adapter, peft_forward_greedy
from tests.server.conftest import assert_error, make_engine, serve

N = 6  # virtual tokens


def test_prompt_tuned_completion(tmp_path: Path) -> None:
    base = DEMO_DIR / "model"
    adapter = make_kind_adapter(
        base, tmp_path / "pt", "prompt_tuning", seed=4, num_virtual_tokens=N
    )
    engine = make_engine({"pt": adapter}, dtype="float32")
    served = serve(engine)
    try:
        ids = engine.tokenizer("hello=").input_ids
        want = peft_forward_greedy(base, adapter, ids, 6)
        eos = engine.eos_token_ids
        if any(t in eos for t in want):  # the engine stops at the end of sequence
            want = want[: next(i for i, t in enumerate(want) if t in eos) + 1]
        text = engine.tokenizer.decode(want, skip_special_tokens=True)
        client = served.openai()
        out = client.completions.create(
            model="pt", prompt="hello=", max_tokens=6, temperature=0.0, echo=True
        )
        assert out.choices[0].text == "hello=" + text
        assert out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(want))
        limit = engine.config.model.max_model_len
        with served.http() as http:  # fits the base model's context, not beside 6 virtual
            body = {"model": "pt", "prompt": "hello=", "max_tokens": limit - len(ids)}
            error = assert_error(http.post("/v1/completions", json=body), 400,
                                 "context_length_exceeded", "prompt")  # fmt: skip
        assert f"the adapter's virtual tokens ({N})" in error["message"]
        # a chat without max_tokens fills the context beside the virtual tokens
        chat = client.chat.completions.create(
            model="pt", messages=[{"role": "user", "content": "hello"}], temperature=0.0
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage is not None
        assert chat.usage.prompt_tokens + chat.usage.completion_tokens + N <= limit
        served.wait_idle()
    finally:
        served.stop()
