"""New adapters from loaded ones, while serving: merge, LoRAHub composition, export.

    POST /v1/adapters/merge              PEFT's add_weighted_adapter, or an exact mixture
    POST /v1/adapters/compose            202 + a job id; LoRAHub from a few examples
    GET  /v1/adapters/compose/{job}      the job's status, step, loss history and weights
    POST /v1/adapters/{name}/export      the base with the adapter merged in, as a model dir

Admin routes (registered with the adapter-management routes, same keys). The tensor work
runs in worker threads, never on the event loop or the engine thread; composition jobs run
in their own thread and score through the engine thread like any request, so serving never
pauses. ``save`` writes a PEFT directory under the first ``--adapter-root``; exports go
under ``--export-root``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from adapters.compose import ComposeJob, ComposeSpec, Example, mixture_as_adapter
from adapters.errors import INVALID_MERGE, AdapterError
from adapters.loader import LoraAdapterWeights
from adapters.merge import MIXTURE, MergeSpec, check_merge, merge_adapters
from adapters.peft_writer import save_peft_adapter
from engine.composition import RunBatch, start_composition
from engine.config import DTYPES
from engine.export import write_merged
from engine.outputs import RequestOutput
from engine.scoring import SCORING_PARAMS
from server.auth import require_admin
from server.body import read_body
from server.bridge import EngineBridge
from server.errors import APIError, from_adapter_error
from server.protocol import ComposeRequest, ExportRequest, MergeAdaptersRequest, parse_body
from server.request_group import RequestGroup
from server.state import ServerState

logger = logging.getLogger(__name__)


def adapter_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    config, engine = state.config, state.engine
    export_lock = asyncio.Lock()

    def save_dir(save: bool, name: str) -> Path | None:
        """Where ``save`` writes ``name`` (400 without an adapter root, 409 if taken)."""
        if not save:
            return None
        if not config.adapter_roots:
            raise APIError(400, "invalid_request", "save needs an --adapter-root to save into")
        root = config.adapter_roots[0]
        if (root / name).exists():
            raise APIError(
                409, "adapter_already_saved", f"the adapter root already holds {name!r}", "name"
            )
        return root

    @router.post("/v1/adapters/merge")
    async def merge(request: Request) -> dict[str, Any]:
        require_admin(config, request.headers.raw)
        body = parse_body(await read_body(request, config.max_request_bytes), MergeAdaptersRequest)
        if body.name == config.model_name:
            raise APIError(409, "adapter_already_loaded", "that name is the base model's", "name")
        root = save_dir(body.save, body.name)
        try:
            spec = MergeSpec(
                adapters=tuple(body.adapters),
                weights=tuple(body.weights),
                combination_type=body.combination_type,
                density=body.density,
                majority_sign_method=body.majority_sign_method,
                svd_rank=body.svd_rank,
                svd_clamp=body.svd_clamp,
                svd_full_matrices=body.svd_full_matrices,
                seed=body.seed,
            )
            async with state.admin_lock:
                rank = await asyncio.to_thread(_merge, state, body.name, spec, root)
        except AdapterError as e:
            raise from_adapter_error(e, "adapters") from None
        logger.info(
            "merged %s into %s (%s)", ", ".join(body.adapters), body.name, spec.combination_type
        )
        return {
            "status": "ok",
            "name": body.name,
            "combination_type": spec.combination_type,
            "rank": rank,
            "saved": root is not None,
        }

    @router.post("/v1/adapters/compose", status_code=202)
    async def compose(request: Request) -> JSONResponse:
        require_admin(config, request.headers.raw)
        body = parse_body(await read_body(request, config.max_request_bytes), ComposeRequest)
        if body.name == config.model_name:
            raise APIError(409, "adapter_already_loaded", "that name is the base model's", "name")
        running = sum(1 for j in state.compose_jobs.values() if j.status in ("queued", "running"))
        if running >= config.max_compose_jobs:
            raise APIError(
                429,
                "too_many_compositions",
                f"{running} compositions are running; retry later",
                headers={"Retry-After": "5"},
            )
        root = save_dir(body.save, body.name)
        candidates = body.candidates
        if candidates is None:  # every loaded adapter but mixtures (past the cap: a 400)
            candidates = [
                e.name
                for e in engine.adapters.registry.entries()
                if not e.is_mixture and not e.name.startswith("_")
            ]
        spec = ComposeSpec(
            name=body.name,
            candidates=tuple(candidates),
            examples=tuple(Example(e.prompt, e.completion) for e in body.examples),
            method=body.method,
            max_steps=body.max_steps,
            l1=body.l1,
            bounds=(body.bounds[0], body.bounds[1]),
            seed=body.seed,
            save=body.save,
        )
        run_batch = _bridge_runner(state.bridge, asyncio.get_running_loop())
        try:
            job = start_composition(
                engine,
                spec,
                run_batch,
                save_dir=root,
                max_candidates=config.max_compose_candidates,
                max_steps=config.max_compose_steps,
            )
        except AdapterError as e:
            raise from_adapter_error(e, "candidates") from None
        state.compose_jobs[job.id] = job
        _forget_old_jobs(state.compose_jobs)
        logger.info(
            "composition %s started: %s over %d candidates", job.id, spec.method, len(candidates)
        )
        return JSONResponse(job.snapshot(), status_code=202)

    @router.get("/v1/adapters/compose/{job_id}")
    async def compose_status(job_id: str, request: Request) -> dict[str, Any]:
        require_admin(config, request.headers.raw)
        job = state.compose_jobs.get(job_id)
        if job is None:
            raise APIError(404, "job_not_found", f"no composition job {job_id!r}", "job")
        return job.snapshot()

    @router.post("/v1/adapters/{name}/export")
    async def export(name: str, request: Request) -> dict[str, Any]:
        require_admin(config, request.headers.raw)
        body = parse_body(await read_body(request, config.max_request_bytes), ExportRequest)
        if config.export_root is None:
            raise APIError(400, "export_disabled", "exports need the server's --export-root")
        try:
            adapter = await asyncio.to_thread(_adapter_weights, state, name)
        except AdapterError as e:
            raise from_adapter_error(e, "name") from None
        out = config.export_root / (body.out or name)
        async with export_lock:  # one export at a time; loads and unloads go on meanwhile
            if out.exists():
                raise APIError(409, "export_exists", f"the export root already holds {out.name!r}")
            try:
                await asyncio.to_thread(
                    write_merged,
                    engine.config.model.model_dir,
                    adapter,
                    out,
                    DTYPES[body.dtype],
                    body.quantization,
                )
            except ValueError as e:  # AdapterError included: the adapter does not fit
                raise APIError(400, "export_failed", str(e), "name") from None
        logger.info("exported %s merged into the base to %s", name, out)
        return {
            "status": "ok",
            "name": name,
            "out": out.name,
            "dtype": body.dtype,
            "quantization": body.quantization,
        }

    return router


def _merge(state: ServerState, name: str, spec: MergeSpec, save_to: Path | None) -> int:
    """Merge, save if asked, then register (a worker thread); returns the rank served.

    Every check runs before the tensor work, and the save before the registration, so a
    refusal or a failed save leaves nothing registered.
    """
    engine = state.engine
    manager = engine.adapters
    entries = [manager.get(n) for n in spec.adapters]
    for entry in entries:
        if entry.is_mixture:
            raise AdapterError(
                INVALID_MERGE, f"{entry.name!r} is a mixture; merge its components instead"
            )
    weights = [manager.weights_of(e) for e in entries]
    if spec.combination_type == MIXTURE:
        if save_to is not None:
            save_peft_adapter(mixture_as_adapter(weights, spec.weights, name), save_to / name)
        engine.register_mixture(name, list(zip(spec.adapters, spec.weights, strict=True)))
        return max(e.max_rank for e in entries)
    rank = check_merge(weights, spec, manager.layout).r
    if rank > manager.max_lora_rank:
        raise AdapterError(
            "adapter_rank_too_large",
            f"the merged rank {rank} exceeds the server's max_lora_rank {manager.max_lora_rank}",
        )
    merged = merge_adapters(weights, spec, name, layout=manager.layout)
    if save_to is not None:
        save_peft_adapter(merged, save_to / name)
    engine.load_lora_weights(name, merged)
    return merged.max_rank


def _adapter_weights(state: ServerState, name: str) -> LoraAdapterWeights:
    """A loaded adapter's weights; a mixture's as the one adapter it equals."""
    manager = state.engine.adapters
    entry = manager.get(name)
    if entry.is_mixture:
        parts = [(manager.weights_of(c), w) for c, w in entry.components]
        return mixture_as_adapter([p for p, _ in parts], [w for _, w in parts], name)
    return manager.weights_of(entry)


_KEPT_JOBS = 64  # finished composition jobs kept for polling


def _forget_old_jobs(jobs: dict[str, ComposeJob]) -> None:
    finished = [j for j in jobs.values() if j.status in ("succeeded", "failed")]
    for job in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - _KEPT_JOBS)]:
        del jobs[job.id]


def _bridge_runner(bridge: EngineBridge, loop: asyncio.AbstractEventLoop) -> RunBatch:
    """A composition's ``run_batch``: submits through the bridge from the job's thread.

    At most a quarter of the bridge's queue at a time, so a composition never crowds out
    (or is refused for) ordinary traffic; a refused submission aborts what it had queued.
    """
    chunk = max(1, bridge.max_pending // 4)

    async def run(batch: list[tuple[list[int], str]]) -> list[RequestOutput]:
        finals: list[RequestOutput] = []
        for lo in range(0, len(batch), chunk):
            groups: list[RequestGroup] = []
            try:
                for ids, adapter in batch[lo : lo + chunk]:
                    groups.append(bridge.submit([(ids, SCORING_PARAMS)], lora=adapter))
                for group in groups:
                    final = None
                    async for _, output in group:
                        if output.finished:
                            final = output
                    assert final is not None
                    finals.append(final)
            except BaseException:
                for group in groups:
                    bridge.abort(group)
                raise
        return finals

    def run_batch(batch: list[tuple[list[int], str]]) -> list[RequestOutput]:
        return asyncio.run_coroutine_threadsafe(run(batch), loop).result()

    return run_batch
