"""Composition jobs against a live engine: LoRAHub's search, scored by the engine itself.

:func:`start_composition` checks a :class:`~adapters.compose.ComposeSpec` against the loaded
adapters and returns a :class:`~adapters.compose.ComposeJob` whose thread (or the caller,
offline) runs the search. Each evaluation registers a temporary adapter (the LoRAHub
combination, or a mixture of the candidates), scores every example under it in one batch
through ``run_batch``, and unloads it; other requests keep running between and alongside.
The best weights end as a registered adapter named ``spec.name``, saved as a PEFT directory
under ``save_dir`` when asked.

``run_batch([(prompt, adapter), ...])`` submits token-id prompts, each for its adapter, and
returns their final outputs in order; the server passes one that goes through its engine
thread, the offline :meth:`engine.llm.LLM.compose` one that steps the engine itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path

from adapters.atomic_dir import write_directory
from adapters.compose import (
    ComposeJob,
    ComposeSpec,
    lorahub_combine,
    mixture_as_adapter,
)
from adapters.errors import INVALID_COMPOSITION, AdapterError
from adapters.peft_writer import save_peft_adapter
from adapters.weights import AdapterWeights
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.scoring import SCORING_PARAMS, mean_nll, scoring_prompt

RunBatch = Callable[[list[tuple[list[int], str]]], list[RequestOutput]]

# Limits of one composition (the server's flags override them).
MAX_CANDIDATES = 32
MAX_STEPS = 200
MAX_EXAMPLES = 64


def start_composition(
    engine: LLMEngine,
    spec: ComposeSpec,
    run_batch: RunBatch,
    save_dir: Path | None = None,
    background: bool = True,
    max_candidates: int = MAX_CANDIDATES,
    max_steps: int = MAX_STEPS,
) -> ComposeJob:
    """Validate ``spec`` and start its job (in a thread when ``background``).

    Raises:
        AdapterError: ``invalid_composition`` (a broken rule), ``model_not_found`` (an
            unknown candidate), ``adapter_already_loaded`` (``spec.name`` is taken).
    """
    manager = engine.adapters
    spec.validate(max_candidates, max_steps, MAX_EXAMPLES)
    if spec.name in manager.registry.names():
        raise AdapterError(
            "adapter_already_loaded", f"an adapter named {spec.name!r} is already loaded"
        )
    if spec.save and save_dir is None:
        raise AdapterError(INVALID_COMPOSITION, "save needs an --adapter-root to save into")
    entries = [manager.get(name) for name in spec.candidates]
    for entry in entries:
        if entry.is_mixture:
            raise AdapterError(
                INVALID_COMPOSITION, f"{entry.name!r} is a mixture; candidates must be adapters"
            )
    eos = min(engine.eos_token_ids) if engine.eos_token_ids else None
    prompts = [scoring_prompt(engine.tokenizer, e.prompt, e.completion, eos) for e in spec.examples]
    for p in prompts:
        try:
            engine.validate(p.token_ids, SCORING_PARAMS)
        except ValueError as e:
            raise AdapterError(
                INVALID_COMPOSITION, f"an example is too long to score: {e}"
            ) from None
    weights: list[AdapterWeights] = []  # read lazily, in the job's thread
    job = ComposeJob(spec)

    def candidates() -> list[AdapterWeights]:
        if not weights:
            weights.extend(manager.weights_of(entry) for entry in entries)
        return weights

    def register(name: str, w: list[float]) -> AdapterWeights | None:
        if spec.method == "mixture":
            manager.register_mixture(name, list(zip(spec.candidates, w, strict=True)))
            return None
        combined = lorahub_combine(candidates(), w, name)
        manager.load_weights(name, combined)
        return combined

    def evaluate(ws: list[list[float]]) -> list[float]:
        # "_" cannot start a name clients give, so these never collide and stay unlisted.
        names = [f"_{job.id}.step{job.step + 1 + i}" for i in range(len(ws))]
        try:
            for name, w in zip(names, ws, strict=True):
                register(name, w)
            batch = [(p.token_ids, name) for name in names for p in prompts]
            outputs = run_batch(batch)
        finally:
            for name in names:
                # Never registered, or an admin unloaded it already: nothing to do.
                with contextlib.suppress(AdapterError):
                    engine.unload_lora(name)
        n = len(prompts)
        losses = [mean_nll(o, prompts[i % n].num_targets) for i, o in enumerate(outputs)]
        return [sum(losses[k * n : (k + 1) * n]) / n for k in range(len(ws))]

    def finish(w: list[float]) -> str:
        # Saved first: a save that fails leaves nothing registered.
        if spec.save and save_dir is not None:
            if spec.method == "mixture":  # saved as the one adapter it equals
                saved = mixture_as_adapter(candidates(), w, spec.name)
            else:
                saved = lorahub_combine(candidates(), w, spec.name)
            write_directory(save_dir / spec.name, lambda d: save_peft_adapter(saved, d))
        register(spec.name, w)
        return spec.name

    if background:
        thread = threading.Thread(target=job.run, args=(evaluate, finish), name=job.id, daemon=True)
        thread.start()
    else:
        job.run(evaluate, finish)
    return job
