"""A blocking, batch-at-once front end over :class:`LLMEngine`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from adapters.compose import ComposeJob, ComposeSpec
from engine.composition import start_composition
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scoring import SCORING_PARAMS


class LLM:
    """Load a model and generate for a list of prompts.

    Example:
        >>> llm = LLM()  # the bundled demo model
        >>> llm.generate(["hello="], SamplingParams(temperature=0))[0].text
        'hello'
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        kernels: str | None = None,
        config: EngineConfig | None = None,
        **options: Any,
    ) -> None:
        """``options`` take the keyword arguments of :meth:`EngineConfig.create`; or pass a
        ready ``config``."""
        if config is None:
            config = EngineConfig.create(model_dir, **options)
        self.engine = LLMEngine(config, kernels=kernels)

    def compose(self, spec: ComposeSpec, save_dir: Path | None = None) -> ComposeJob:
        """Run a LoRAHub composition to its end in this thread (see
        :mod:`engine.composition`); the result is registered as ``spec.name``."""
        return start_composition(self.engine, spec, self._run_batch, save_dir, background=False)

    def _run_batch(self, batch: list[tuple[list[int], str]]) -> list[RequestOutput]:
        """Run scoring requests to the end, stepping the engine here."""
        ids = [self.engine.add_request(p, SCORING_PARAMS, lora=a) for p, a in batch]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (continuously batched); outputs in prompt order."""
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not progress) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]
