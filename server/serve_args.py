"""The flags of ``loraserve serve``, apart from the server itself.

Kept light (no web framework imported), so that ``loraserve --help`` and the commands that
never serve (``generate``, ``bench``) run where the HTTP stack is not installed, such as a
bare GPU image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from adapters.kinds import config_kind
from adapters.weights import ADALORA, LORA
from engine.config import DEMO_DIR
from server.config import METRICS_COMPAT
from server.engine_args import add_engine_args

logger = logging.getLogger(__name__)


def add_startup_adapter_args(parser: argparse.ArgumentParser) -> None:
    """The adapters loaded at start-up (``serve``; ``plan`` sizes the pool for them too)."""
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=PATH",
        help="adapters to serve from the start (the default pool holds them all)",
    )
    parser.add_argument(
        "--pinned-lora-modules",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="startup adapters (--lora-modules names, or the demo's) kept in the page pool "
        "until unloaded",
    )


def lora_modules(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The startup adapters, ``(name, directory)``: with no model directory every trained
    demo adapter (those a split model serves, with ``--tensor-parallel-size``), then
    ``--lora-modules``."""
    modules = []
    if args.model_dir is None:
        for path in sorted((DEMO_DIR / "adapters").iterdir()):
            config = path / "adapter_config.json"
            if not config.is_file():
                if path.is_dir():
                    logger.warning("demo adapter %s is not trained yet; skipped", path.name)
                continue
            kind = config_kind(json.loads(config.read_text()))
            split = getattr(args, "tensor_parallel_size", 1) > 1
            if split and kind not in (LORA, ADALORA):
                logger.warning(
                    "demo adapter %s is %s; a model split across tensor-parallel workers "
                    "serves LoRA only; skipped",
                    path.name,
                    kind,
                )
                continue
            modules.append((path.name, path))
    for spec in args.lora_modules:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH, got {spec!r}")
        modules.append((name, Path(path)))
    return modules


def pinned_modules(args: argparse.Namespace, adapters: list[tuple[str, Path]]) -> list[str]:
    """``--pinned-lora-modules``: names among the startup adapters, loaded pinned."""
    names = {name for name, _ in adapters}
    unknown = [name for name in args.pinned_lora_modules if name not in names]
    if unknown:
        raise ValueError(
            f"--pinned-lora-modules names {', '.join(unknown)}, not among the startup adapters "
            f"({', '.join(sorted(names)) or 'none'}); add them to --lora-modules"
        )
    return list(dict.fromkeys(args.pinned_lora_modules))


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", default=None, help="a Hugging Face model dir")
    add_startup_adapter_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the base model's API name")
    add_engine_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    access = parser.add_argument_group("access")
    access.add_argument(
        "--api-key",
        default=os.environ.get("LORASERVE_API_KEY"),
        help="required on every route but /health (default: $LORASERVE_API_KEY)",
    )
    access.add_argument(
        "--admin-api-key",
        default=os.environ.get("LORASERVE_ADMIN_API_KEY"),
        help="required for adapter management (default: $LORASERVE_ADMIN_API_KEY)",
    )
    access.add_argument(
        "--enable-runtime-lora-loading",
        action="store_true",
        help="expose adapter loading without an admin key",
    )
    access.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="runtime lora_path values must lie inside one of these",
    )
    access.add_argument(
        "--lora-cache-dir",
        default=None,
        metavar="DIR",
        help="enable adapter sources: a lora_path may be a URI (hf://ORG/REPO[@REV], a "
        "--lora-source, a plugin's s3:// ...), fetched into DIR (off without it)",
    )
    access.add_argument(
        "--lora-source",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve NAME://sub/path from DIR/sub/path (a mounted bucket); needs --lora-cache-dir",
    )
    access.add_argument("--allowed-origins", nargs="*", default=[], help="CORS origins")
    access.add_argument(
        "--export-root",
        default=None,
        metavar="DIR",
        help="where POST /v1/adapters/{name}/export writes merged models (off without it)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-waiting-requests", type=int, default=256)
    limits.add_argument("--max-request-bytes", type=int, default=1 << 20)
    limits.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, on SIGTERM")
    limits.add_argument("--watchdog-timeout", type=float, default=60.0)
    limits.add_argument(
        "--lora-fetch-timeout", type=float, default=300.0, help="seconds a load waits for a source"
    )
    limits.add_argument("--max-compose-candidates", type=int, default=32)
    limits.add_argument("--max-compose-steps", type=int, default=200)
    limits.add_argument("--max-compose-jobs", type=int, default=2, help="running at once")
    limits.add_argument(
        "--max-metric-adapters",
        type=int,
        default=32,
        help="adapters with a metrics label and a status row of their own; the rest share one",
    )
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument(
        "--metrics-compat",
        choices=METRICS_COMPAT,
        default="none",
        help="also export the metrics routers read under vLLM's names "
        "(vllm:num_requests_waiting, vllm:lora_requests_info, ...)",
    )
    parser.add_argument(
        "--disable-console", action="store_true", help="do not serve the operator console at /"
    )
    ray = parser.add_argument_group("Ray Serve (pip install 'loraserve[ray]')")
    ray.add_argument(
        "--ray-replicas",
        type=int,
        default=0,
        metavar="N",
        help="serve with N replicas on a local Ray instance, each request routed to a "
        "replica holding its adapter (default: one server, no Ray)",
    )
    ray.add_argument(
        "--ray-max-adapters-per-replica",
        type=int,
        default=None,
        metavar="N",
        help="adapters one replica holds at once (default: those of --max-lora-rank that "
        "fit in its pool beside one full-length request)",
    )
    ray.add_argument(
        "--ray-replica-gpus",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per replica (default: 1 where CUDA is available, else 0)",
    )
    engine = parser.add_argument_group("engine process")
    engine.add_argument(
        "--engine-in-process",
        action="store_true",
        help="step the engine in a thread of the HTTP process (no engine process)",
    )
    engine.add_argument(
        "--engine-startup-timeout", type=float, default=1800.0, help="seconds to build it"
    )
    engine.add_argument(
        "--engine-failure-exit-delay",
        type=float,
        default=5.0,
        help="seconds of 503s after the engine (its process or, in process, its thread) dies, "
        "before exiting with status 1",
    )
