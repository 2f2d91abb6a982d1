"""The adapter routes' work on the engine side: loads, merge, export and the composition jobs.

Both forms of the server run these next to the :class:`~engine.LLMEngine`: the in-process
server from its worker threads, the engine process from its own (the routes reach them
through :mod:`server.engine_handle`). Refusals are ``AdapterError`` (the route picks the
``param``) or a ready :class:`~server.errors.APIError`.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from adapters.atomic_dir import write_directory
from adapters.compose import ComposeJob, ComposeSpec, mixture_as_adapter
from adapters.errors import INVALID_MERGE, AdapterError
from adapters.ia3 import merge_ia3, save_ia3_adapter
from adapters.merge import MIXTURE, MergeSpec, check_merge, merge_adapters
from adapters.mixture import MIXABLE_KINDS
from adapters.peft_writer import save_peft_adapter
from adapters.weights import IA3, AdapterWeights
from engine.checkpoint import DTYPES
from engine.composition import RunBatch, start_composition
from engine.export import write_merged
from engine.llm_engine import LLMEngine
from server.errors import APIError, from_storage_error


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What ``/v1/models`` says of a registered adapter: the version it serves, whether
    it is pinned (kept in the pool until unloaded), and its kind (``lora``, ``dora``,
    ``ia3``, ...; a mixture is ``lora``), and the positions its requests take before
    their own tokens (prompt and prefix tuning)."""

    version: int
    pinned: bool = False
    kind: str = "lora"
    num_virtual_tokens: int = 0


def load_adapter(
    engine: LLMEngine, name: str, path: Path, replace: bool, pinned: bool = False
) -> int:
    """Load (or, with ``replace``, swap in) a PEFT adapter, ``pinned`` if asked; returns the
    version now served."""
    return engine.load_lora(name, path, replace, pinned)


def adapter_infos(engine: LLMEngine) -> dict[str, AdapterInfo]:
    """Every registered name (temporary ``_`` ones included), its version and pin."""
    pinned = set(engine.adapters.pinned_names())
    return {
        e.name: AdapterInfo(e.version, e.name in pinned, e.kind, e.num_virtual_tokens)
        for e in engine.adapters.registry.entries()
    }


def merge_adapter(engine: LLMEngine, name: str, spec: MergeSpec, save_to: Path | None) -> int:
    """Merge, save if asked, then register (a worker thread); returns the rank served.

    Every check runs before the tensor work, and the save before the registration, so a
    refusal or a failed save leaves nothing registered; nor anything on disk: the save is
    whole or absent (:func:`save_then_register`).

    Raises:
        AdapterError: the merge's refusals, or the registration's (the name is taken).
        APIError: 507 ``insufficient_storage`` (or 500 ``storage_error``) when the save
            could not be written.
    """
    manager = engine.adapters
    if name in manager.registry.names():  # before any work (registration checks again)
        raise AdapterError("adapter_already_loaded", f"an adapter named {name!r} is already loaded")
    entries = [manager.get(n) for n in spec.adapters]
    for entry in entries:
        if entry.is_mixture:
            raise AdapterError(
                INVALID_MERGE, f"{entry.name!r} is a mixture; merge its components instead"
            )
    weights = [manager.weights_of(e) for e in entries]
    if all(w.kind == IA3 for w in weights) and spec.combination_type != MIXTURE:
        return _merge_ia3(engine, name, spec, weights, save_to)
    if spec.combination_type == MIXTURE:
        mixture = mixture_as_adapter(weights, spec.weights, name)
        save_then_register(
            _saved_at(save_to, name),
            lambda out: save_peft_adapter(mixture, out),
            lambda: engine.register_mixture(
                name, list(zip(spec.adapters, spec.weights, strict=True))
            ),
        )
        return max(e.max_rank for e in entries)
    rank = check_merge(weights, spec, manager.layout).r
    if rank > manager.max_lora_rank:
        raise AdapterError(
            "adapter_rank_too_large",
            f"the merged rank {rank} exceeds the server's max_lora_rank {manager.max_lora_rank}",
        )
    merged = merge_adapters(weights, spec, name, layout=manager.layout)
    save_then_register(
        _saved_at(save_to, name),
        lambda out: save_peft_adapter(merged, out),
        lambda: engine.load_lora_weights(name, merged),
    )
    return merged.max_rank


def _merge_ia3(
    engine: LLMEngine,
    name: str,
    spec: MergeSpec,
    weights: list[AdapterWeights],
    save_to: Path | None,
) -> int:
    """IA³ adapters merged as PEFT merges them: a weighted sum of their vectors."""
    if spec.combination_type != "linear":
        raise AdapterError(
            INVALID_MERGE,
            "IA³ adapters merge by a weighted sum of their vectors (PEFT's IA³ "
            "add_weighted_adapter): use combination_type 'linear'",
        )
    merged = merge_ia3(weights, spec.weights, name)
    save_then_register(
        _saved_at(save_to, name),
        lambda out: save_ia3_adapter(merged, out, engine.adapters.layout),
        lambda: engine.load_lora_weights(name, merged),
    )
    return 0


def _saved_at(save_to: Path | None, name: str) -> Path | None:
    return None if save_to is None else save_to / name


def save_then_register(
    out: Path | None, write: Callable[[Path], object], register: Callable[[], object]
) -> None:
    """Write a new adapter directory ``out`` (when asked) with ``write(directory)``, then
    ``register()`` the adapter, all or nothing.

    The directory appears whole or not at all (:func:`adapters.atomic_dir.write_directory`),
    so a failed write (a full disk) leaves nothing; a registration refused after the save
    removes the saved directory (the request failed: a retry must not find the name taken
    on disk).

    Raises:
        APIError: 507 ``insufficient_storage`` or 500 ``storage_error`` when writing failed.
        Whatever ``register`` raises.
    """
    if out is None:
        register()
        return
    try:
        write_directory(out, write)
    except OSError as e:
        raise from_storage_error(e, "the save") from None
    try:
        register()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def adapter_weights(engine: LLMEngine, name: str) -> AdapterWeights:
    """A loaded adapter's weights; a mixture's as the one adapter it equals."""
    manager = engine.adapters
    entry = manager.get(name)
    if entry.is_mixture:
        parts = [(manager.weights_of(c), w) for c, w in entry.components]
        return mixture_as_adapter([p for p, _ in parts], [w for _, w in parts], name)
    return manager.weights_of(entry)


def export_adapter(engine: LLMEngine, name: str, out: Path, dtype: str, quantization: str) -> None:
    """Write the base with ``name`` merged in to ``out`` (a worker thread).

    Raises:
        AdapterError: no adapter ``name`` (the route maps it).
        APIError: 400 ``export_failed`` when the adapter does not fit the base; 507
            ``insufficient_storage`` (or 500 ``storage_error``) when the directory could not
            be written, in which case nothing of it is left (:func:`engine.export.write_model_dir`).
    """
    adapter = adapter_weights(engine, name)
    try:
        write_merged(engine.config.model.model_dir, adapter, out, DTYPES[dtype], quantization)
    except ValueError as e:  # AdapterError included: the adapter does not fit
        raise APIError(400, "export_failed", str(e), "name") from None
    except OSError as e:
        raise from_storage_error(e, "the export") from None


def compose_candidates(engine: LLMEngine) -> list[str]:
    """A composition's default candidates: every loaded LoRA adapter but mixtures and
    temporary ones (other kinds have no LoRA to weigh)."""
    return [
        e.name
        for e in engine.adapters.registry.entries()
        if not e.is_mixture
        and not e.name.startswith("_")
        and e.kind in MIXABLE_KINDS
        and e.lora_only
    ]


_KEPT_JOBS = 64  # finished composition jobs kept for polling


class ComposeJobs:
    """The composition jobs of one engine, finished ones included (the last 64)."""

    def __init__(self) -> None:
        self._jobs: dict[str, ComposeJob] = {}
        self._lock = threading.Lock()

    def start(
        self,
        engine: LLMEngine,
        spec: ComposeSpec,
        default_candidates: bool,
        run_batch: RunBatch,
        save_dir: Path | None,
        max_candidates: int,
        max_steps: int,
        max_jobs: int,
    ) -> ComposeJob:
        """Start a job (``default_candidates``: over every loaded adapter).

        Raises:
            APIError: 429 when ``max_jobs`` are running already.
            AdapterError: from :func:`engine.composition.start_composition`.
        """
        with self._lock:
            running = sum(1 for j in self._jobs.values() if j.status in ("queued", "running"))
            if running >= max_jobs:
                raise APIError(
                    429,
                    "too_many_compositions",
                    f"{running} compositions are running; retry later",
                    headers={"Retry-After": "5"},
                )
            if default_candidates:
                spec = dataclasses.replace(spec, candidates=tuple(compose_candidates(engine)))
            job = start_composition(
                engine,
                spec,
                run_batch,
                save_dir=save_dir,
                max_candidates=max_candidates,
                max_steps=max_steps,
            )
            self._jobs[job.id] = job
            self._forget_old()
        return job

    def get(self, job_id: str) -> ComposeJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[ComposeJob]:
        """The kept jobs, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in ("succeeded", "failed")]
        for job in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - _KEPT_JOBS)]:
            del self._jobs[job.id]
