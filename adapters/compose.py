"""LoRAHub composition: weights for loaded adapters, found from a few examples.

Given candidate adapters and a handful of (prompt, completion) examples, search weights
w (one per candidate, within ``bounds``) that minimise LoRAHub's objective

    loss(w) = mean over examples of the mean cross-entropy of the completion's tokens
              (EOS included) given the prompt, under the adapter that w makes
            + l1 · mean |wᵢ|

with nevergrad's NGOpt (gradient-free, as LoRAHub), ``max_steps`` evaluations in all. An
evaluation scores every example in one batch through the live engine (a teacher-forced pass:
the prompt-logprobs of prompt + completion); serving never pauses.

One departure from LoRAHub, which starts the search at w = 0: the first evaluations are each
candidate alone (wᵢ = 1, the others 0), scored together in one batch and told to NGOpt
before it proposes its own points. For a few candidates and a 40-step budget NGOpt runs
Cobyla, a local method; from w = 0, a saddle for the ``lorahub`` product B̂Â, it can settle
on a blend far worse than one of the candidates (measured on the demo: loss 5.2 against
0.01 for the right adapter alone). With the warm start (when ``max_steps`` covers it) the
result is never worse than the best single candidate, and NGOpt refines from there.

Two ways to make an adapter from w:

* ``lorahub``: LoRAHub's element-wise combination Â = Σ wᵢAᵢ, B̂ = Σ wᵢ·sᵢ·Bᵢ (each
  candidate's scaling folded into its B, the result's scaling 1). Candidates of different
  ranks are zero-padded to the largest rank, a generalisation of the paper (which composes
  adapters of one rank); a module only some candidates adapt gets zeros from the others.
  B̂Â carries the cross terms wᵢwⱼ·sᵢ·BᵢAⱼ, as in the paper.
* ``mixture``: the exact mixture y = Wx + Σ wᵢ·sᵢ·Bᵢ(Aᵢx), a virtual adapter run component
  by component (no cross terms; it costs the sum of the ranks).

A :class:`ComposeJob` runs in its own thread; its state can be read at any time.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adapters.base_layout import ATTENTION_TARGETS
from adapters.errors import INVALID_COMPOSITION, AdapterError
from adapters.peft_config import LoraAdapterConfig
from adapters.weights import AdapterWeights, LoraModuleWeights

logger = logging.getLogger(__name__)

METHODS = ("lorahub", "mixture")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class ComposeSpec:
    """A composition request (the fields of ``POST /v1/adapters/compose``)."""

    name: str
    candidates: tuple[str, ...]
    examples: tuple[Example, ...]
    method: str = "lorahub"
    max_steps: int = 40
    l1: float = 0.05
    bounds: tuple[float, float] = (-1.5, 1.5)
    seed: int = 0
    save: bool = False

    def validate(self, max_candidates: int, max_steps: int, max_examples: int) -> None:
        """Raise ``AdapterError("invalid_composition", ...)`` naming the broken rule."""

        def bad(message: str) -> AdapterError:
            return AdapterError(INVALID_COMPOSITION, message)

        if self.method not in METHODS:
            raise bad(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not self.candidates:
            raise bad("no candidate adapters: load some, or name them in candidates")
        if len(set(self.candidates)) != len(self.candidates):
            raise bad("candidates name each adapter at most once")
        if len(self.candidates) > max_candidates:
            raise bad(
                f"{len(self.candidates)} candidates exceed the limit of {max_candidates} "
                "(--max-compose-candidates)"
            )
        if not self.examples:
            raise bad("examples must hold at least one {prompt, completion}")
        if len(self.examples) > max_examples:
            raise bad(f"{len(self.examples)} examples exceed the limit of {max_examples}")
        if any(not e.completion for e in self.examples):
            raise bad("every example needs a non-empty completion")
        if not 1 <= self.max_steps <= max_steps:
            raise bad(f"max_steps must be between 1 and {max_steps}; got {self.max_steps}")
        lo, hi = self.bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise bad(f"bounds must be two finite numbers, low < high; got {list(self.bounds)}")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise bad(f"l1 must be a non-negative number; got {self.l1}")


def lorahub_combine(
    candidates: Sequence[AdapterWeights], weights: Sequence[float], name: str
) -> AdapterWeights:
    """LoRAHub's Â = Σ wᵢAᵢ, B̂ = Σ wᵢ·sᵢ·Bᵢ per module, zero-padded to the largest rank."""
    keys = sorted({key for c in candidates for key in c.modules})
    rank = max(c.max_rank for c in candidates)
    modules = {}
    for key in keys:
        parts = [
            (c.modules[key], w)
            for c, w in zip(candidates, weights, strict=True)
            if key in c.modules
        ]
        first = parts[0][0]
        a = torch.zeros(rank, first.lora_a.shape[1], dtype=torch.float32)
        b = torch.zeros(first.lora_b.shape[0], rank, dtype=torch.float32)
        for module, w in parts:
            r = module.rank
            a[:r] += w * module.lora_a.float()
            b[:, :r] += (w * module.scaling) * module.lora_b.float()
        modules[key] = LoraModuleWeights(a.contiguous(), b.contiguous(), 1.0)
    return AdapterWeights(name, _exact_config(keys, rank), modules)


def _exact_config(keys: Sequence[tuple[int, str]], rank: int) -> LoraAdapterConfig:
    """A config adapting exactly ``keys`` (candidates may adapt different layers and
    targets): ``target_modules`` is a regex of their module paths. Per-module ranks are
    the writer's business (``rank_pattern``); the scaling is 1 (alpha = r)."""
    paths = [_module_path(layer, target) for layer, target in keys]
    pattern = "|".join(re.escape(p) for p in paths)
    return LoraAdapterConfig(r=rank, lora_alpha=rank, target_modules=pattern)


def _module_path(layer: int, target: str) -> str:
    block = "self_attn" if target in ATTENTION_TARGETS else "mlp"
    return f"model.layers.{layer}.{block}.{target}"


def mixture_as_adapter(
    candidates: Sequence[AdapterWeights], weights: Sequence[float], name: str
) -> AdapterWeights:
    """The mixture Σ wᵢ·sᵢ·BᵢAᵢ as one adapter: A = [Aᵢ] stacked, B = [wᵢ·sᵢ·Bᵢ] side by side,
    scaling 1 (PEFT's ``cat``, without its rsLoRA quirk); each module's rank is the sum of
    the ranks of the candidates that adapt it."""
    keys = sorted({key for c in candidates for key in c.modules})
    modules = {}
    for key in keys:
        parts = [
            (c.modules[key], w)
            for c, w in zip(candidates, weights, strict=True)
            if key in c.modules
        ]
        a = torch.cat([m.lora_a.float() for m, _ in parts], dim=0)
        b = torch.cat([(w * m.scaling) * m.lora_b.float() for m, w in parts], dim=1)
        modules[key] = LoraModuleWeights(a.contiguous(), b.contiguous(), 1.0)
    rank = max(m.rank for m in modules.values())
    return AdapterWeights(name, _exact_config(keys, rank), modules)


@dataclass
class ComposeJob:
    """One composition, run by :meth:`run` in a thread; :meth:`snapshot` reads it anywhere.

    Attributes:
        status: "queued", "running", "succeeded" or "failed".
        step: evaluations done.
        best_loss / best_weights: the best point evaluated so far.
        weights: the weights evaluated last.
        history: (step, loss) of every evaluation.
        result: the registered adapter's name, once succeeded.
    """

    spec: ComposeSpec
    id: str = field(default_factory=lambda: "compose-" + uuid.uuid4().hex[:12])
    status: str = "queued"
    step: int = 0
    best_loss: float | None = None
    best_weights: list[float] | None = None
    weights: list[float] | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    result: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        """The job's state as the polling route returns it."""
        with self._lock:
            names = self.spec.candidates

            def by_name(w: list[float] | None) -> dict[str, float] | None:
                return None if w is None else dict(zip(names, w, strict=True))

            return {
                "id": self.id,
                "object": "adapter.composition",
                "name": self.spec.name,
                "method": self.spec.method,
                "status": self.status,
                "step": self.step,
                "max_steps": self.spec.max_steps,
                "best_loss": self.best_loss,
                "best_weights": by_name(self.best_weights),
                "weights": by_name(self.weights),
                "loss_history": [loss for _, loss in self.history],
                "error": self.error,
                "result": self.result,
                "created": int(self.created),
                "finished": None if self.finished is None else int(self.finished),
            }

    def _record(self, optimizer: Any, points: list[Any], losses: list[float]) -> None:
        """Tell the optimizer each point's loss (plus the L1 term) and keep the history."""
        for point, example_loss in zip(points, losses, strict=True):
            w = [float(v) for v in point.value]
            loss = example_loss + self.spec.l1 * float(np.mean(np.abs(w)))
            optimizer.tell(point, loss)
            with self._lock:
                self.step += 1
                self.weights = w
                self.history.append((self.step, loss))
                if self.best_loss is None or loss < self.best_loss:
                    self.best_loss, self.best_weights = loss, w

    def run(
        self,
        evaluate: Callable[[list[list[float]]], list[float]],
        finish: Callable[[list[float]], str],
    ) -> None:
        """Search the weights, then register the best adapter through ``finish``.

        Args:
            evaluate: the example loss (without the L1 term) of the adapter that each
                weight vector makes, scored together; it builds, scores and discards them.
            finish: registers (and saves, if asked) the final adapter; returns its name.
        """
        spec = self.spec
        with self._lock:
            self.status = "running"
        try:
            import nevergrad as ng  # here: slow to import, and only jobs need it

            lo, hi = spec.bounds
            n = len(spec.candidates)
            init = np.clip(np.zeros(n), lo, hi)
            param = ng.p.Array(init=init, lower=lo, upper=hi)
            param.random_state = np.random.RandomState(spec.seed)
            optimizer = ng.optimizers.NGOpt(parametrization=param, budget=spec.max_steps)
            # Warm start: every candidate alone (wᵢ = 1, the rest 0), scored in one batch.
            starts = [[float(i == j) for j in range(n)] for i in range(n)][: spec.max_steps]
            points = []
            for w in starts:
                optimizer.suggest(np.clip(np.array(w), lo, hi))
                points.append(optimizer.ask())
            self._record(optimizer, points, evaluate([list(map(float, p.value)) for p in points]))
            while self.step < spec.max_steps:
                point = optimizer.ask()
                self._record(optimizer, [point], evaluate([[float(v) for v in point.value]]))
            assert self.best_weights is not None
            name = finish(list(self.best_weights))
            with self._lock:
                self.status, self.result = "succeeded", name
        except Exception as e:  # the job reports every failure; the server goes on
            logger.warning("composition %s failed: %s", self.id, e)
            with self._lock:
                self.status = "failed"
                self.error = _reason(e)
        finally:
            with self._lock:
                self.finished = time.time()
        logger.info(
            "composition %s %s after %d steps (best loss %s)",
            self.id,
            self.status,
            self.step,
            None if self.best_loss is None else round(self.best_loss, 4),
        )


def _reason(error: Exception) -> str:
    """A failed job's error, for clients: an OS error's reason without its path."""
    if isinstance(error, AdapterError):
        return error.message
    if isinstance(error, OSError):
        full = " (the disk is full)" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return f"saving the result failed{full}: {error.strerror or type(error).__name__}"
    return str(error)
