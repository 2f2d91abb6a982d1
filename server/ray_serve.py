"""loraserve on Ray Serve: replicas of the server behind one ingress that sends each request
to a replica already holding its adapter.

Two deployments (``pip install 'loraserve[ray]'``):

- :class:`~server.ray_replica.LoraServeReplica` (``--ray-replicas N`` of them): one whole
  ``loraserve serve`` each (its engine and the same FastAPI app, driven over ASGI), so
  routes, streaming, keys and errors are the server's own. It starts with the base model
  only; an adapter is loaded into it when a request for it arrives, through Ray Serve's
  model multiplexing (``serve.multiplexed``) with the adapter's name as the multiplexed
  model id, so Ray routes a request to a replica that reports holding its adapter. Past
  ``max_num_models_per_replica`` (by default the adapters of the largest rank that fit in
  the pool beside one full-length request) Ray drops a replica's least recently used one.
- :class:`~server.ray_ingress.LoraServeIngress` (one replica): the HTTP entry. It owns the
  adapter catalog (name → path, version, kind: the start-up adapters, then the admin
  routes' loads and unloads), answers ``/v1/models`` and the load and unload routes from
  it, and forwards everything else byte for byte to a replica.

``loraserve serve --ray-replicas N`` starts a local Ray instance and runs this application on
``--host``/``--port`` (:func:`run_ray`); ``serve run`` deploys :func:`app_builder` on an
existing cluster from a config file (``docs/scale-out.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

from ray import serve

from adapters.errors import AdapterError
from adapters.kinds import config_kind
from adapters.loader import read_config_json
from engine.config import EngineConfig
from engine.plan import plan_for
from server.engine_args import engine_config
from server.ray_ingress import LoraServeIngress
from server.ray_replica import CatalogEntry, LoraServeReplica
from server.serve import lora_modules, server_config

logger = logging.getLogger(__name__)


def adapters_per_replica(config: EngineConfig) -> int:
    """How many adapters one replica holds at once: those of ``--max-lora-rank`` on every
    linear layer that fit in its pool beside one full-length request (the plan's figure),
    at most ``--max-resident-loras``, at least one."""
    plan = plan_for(config, ranks=[config.lora.max_lora_rank])
    fits = plan.adapters[0].fits
    most = fits[-1][0] if fits else 1
    return max(1, min(most, config.lora.max_resident_loras))


def build_application(args: argparse.Namespace) -> Any:
    """The Ray Serve application ``loraserve serve --ray-replicas N ...`` runs.

    Raises:
        ValueError: a bad flag, or a start-up adapter that is not one loraserve serves.
    """
    if args.pinned_lora_modules:
        raise ValueError("--pinned-lora-modules: pinning is per server, not with --ray-replicas")
    config = server_config(args)
    startup = lora_modules(args)
    engine = engine_config(args, args.model_dir, args.seed, startup)  # as each replica's
    catalog = {name: _catalog_entry(name, path) for name, path in startup}
    per_replica = args.ray_max_adapters_per_replica or adapters_per_replica(engine)
    replica = serve.deployment(
        name="LoraServeReplica",
        num_replicas=args.ray_replicas,
        ray_actor_options={"num_cpus": 0, "num_gpus": _replica_gpus(args)},
        max_ongoing_requests=args.max_num_seqs + args.max_waiting_requests,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=args.drain_timeout,  # as --drain-timeout on SIGTERM
        graceful_shutdown_wait_loop_s=1,
    )(LoraServeReplica)
    ingress = serve.deployment(
        name="LoraServeIngress",
        num_replicas=1,  # the catalog lives in its memory
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000,
    )(LoraServeIngress)
    max_model_len = engine.model.max_model_len
    return ingress.bind(replica.bind(args, per_replica), config, catalog, max_model_len)


def _catalog_entry(name: str, path: Path) -> CatalogEntry:
    """A start-up adapter's entry; its kind read from its config, as ``/v1/models`` shows it
    before any replica has loaded it."""
    try:
        kind = config_kind(read_config_json(path))
    except AdapterError as e:
        raise ValueError(f"adapter {name}: {e.message}") from None
    if kind is None:
        raise ValueError(f"adapter {name}: its peft_type is not one loraserve serves")
    return CatalogEntry(str(path.resolve()), 1, kind)


def _replica_gpus(args: argparse.Namespace) -> float:
    """GPUs per replica: ``--ray-replica-gpus``, else one where this machine has CUDA."""
    if args.ray_replica_gpus is not None:
        return float(args.ray_replica_gpus)
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def app_builder(builder_args: dict[str, str]) -> Any:
    """``serve run``'s entry: ``args.flags`` in the config file are ``loraserve serve``'s
    flags, e.g. ``{"flags": "/models/llama --lora-modules a=/adapters/a --ray-replicas 4"}``."""
    from server.serve_args import add_serve_args

    parser = argparse.ArgumentParser(prog="loraserve serve")
    add_serve_args(parser)
    args = parser.parse_args(shlex.split(builder_args.get("flags", "")))
    args.ray_replicas = args.ray_replicas or 1
    return build_application(args)


def run_ray(args: argparse.Namespace) -> int:
    """``loraserve serve --ray-replicas N``: a local Ray instance, the application on
    ``--host``/``--port``, until SIGINT or SIGTERM (then Ray drains the replicas for
    ``--drain-timeout`` seconds)."""
    import ray

    application = build_application(args)
    ray.init(include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name="loraserve", route_prefix="/")
        logger.info(
            "serving %s on %d replicas at http://%s:%d (Ray Serve)",
            json.dumps(args.model_dir or "the demo"),
            args.ray_replicas,
            args.host,
            args.port,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return 0
