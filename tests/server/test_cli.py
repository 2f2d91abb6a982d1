"""``loraserve serve``'s flags (the running command is exercised by the SIGTERM test)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

import pytest

from engine.config import DEMO_DIR, EngineConfig
from server.cli import main
from server.engine_args import engine_config
from server.engine_core import build_from_spec, engine_info
from server.engine_protocol import HEADER_BYTES, Hello, decode_to_engine, frame
from server.serve import DEMO_MODEL_NAME, engine_spec, server_config
from server.serve_args import add_serve_args
from tests.server.conftest import demo_adapters


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(argv)


def test_demo_defaults() -> None:
    config = server_config(parse())
    assert config.model_name == DEMO_MODEL_NAME
    assert config.adapter_roots == (DEMO_DIR / "adapters",)
    assert config.api_key is None and config.admin_api_key is None
    assert not config.admin_routes_enabled and config.cors_origins == ()


def test_access_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("LORASERVE_API_KEY", "from-env")
    args = parse(
        "some/model_dir", "--admin-api-key", "adm", "--adapter-root", "/a", "--adapter-root",
        "/b", "--allowed-origins", "https://x.example", "--lora-modules", "a=/p", "b=/q",
    )  # fmt: skip
    config = server_config(args)
    assert config.model_name == "model_dir"
    assert config.api_key == "from-env" and config.admin_api_key == "adm"
    assert config.admin_routes_enabled
    assert [str(r) for r in config.adapter_roots] == ["/a", "/b"]
    assert config.cors_origins == ("https://x.example",)
    assert args.lora_modules == ["a=/p", "b=/q"]
    assert server_config(parse("--enable-runtime-lora-loading")).admin_routes_enabled
    assert server_config(parse("--max-metric-adapters", "5")).max_metric_adapters == 5
    assert server_config(parse()).console and not server_config(parse("--disable-console")).console


@pytest.mark.parametrize("spec", ["noequals", "=path", "name="])
def test_bad_lora_modules_exit_2(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--lora-modules", spec]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_the_command_line_runs_without_the_http_stack() -> None:
    """A GPU image may lack the web framework: every command but ``serve`` still parses and
    ``--help`` works, importing neither fastapi nor uvicorn."""
    code = (
        "import sys\n"
        "sys.modules.update(fastapi=None, uvicorn=None, starlette=None)\n"
        "from server.cli import main\n"
        "for argv in (['--help'], ['bench', 'sweep', '--help'], ['generate', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "assert 'server.serve' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_graph_flags_reach_the_engine_config() -> None:
    args = parse("--enforce-eager", "--cuda-graph-sizes", "1,4,8", "--num-pages", "64")
    assert args.enforce_eager and args.cuda_graph_sizes == (1, 4, 8)
    config = engine_config(args, None)
    assert config.graphs.mode == "eager" and config.graphs.sizes == (1, 4, 8)
    with pytest.raises(SystemExit):
        parse("--cuda-graph-sizes", "4,zero")


def test_prefix_cache_flags_reach_the_engine_config() -> None:
    default = engine_config(parse("--num-pages", "64"), None).cache
    assert default.enable_prefix_caching and default.block_size == 16
    args = parse("--no-enable-prefix-caching", "--block-size", "32", "--num-pages", "64")
    cache = engine_config(args, None).cache
    assert not cache.enable_prefix_caching and cache.block_size == 32
    assert engine_config(parse("--enable-prefix-caching"), None).cache.enable_prefix_caching
    for bad in ("0", "-16", "x"):
        with pytest.raises(SystemExit):
            parse("--block-size", bad)


def test_prefix_cache_flags_reach_the_engine_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags travel in the EngineSpec (encoded, decoded) and the engine process builds its
    config from them, as ``--enforce-eager`` does."""
    import server.serve

    monkeypatch.setattr(server.serve, "LLMEngine", lambda config: config)  # no model built
    args = parse("--no-enable-prefix-caching", "--block-size", "8", "--num-pages", "64")
    spec = engine_spec(args, [])
    hello = decode_to_engine(frame(Hello("token", spec))[HEADER_BYTES:])
    assert isinstance(hello, Hello)
    config: Any = build_from_spec(hello.spec)
    assert isinstance(config, EngineConfig)
    assert not config.cache.enable_prefix_caching and config.cache.block_size == 8
    assert config.cache.num_pages == 64


def test_generate_takes_the_prefix_cache_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import server.cli

    built: list[EngineConfig] = []

    class FakeLLM:  # records its config; builds no model
        def __init__(self, config: EngineConfig) -> None:
            built.append(config)

        def generate(self, prompts: list[str], params: object) -> list[Any]:
            return [argparse.Namespace(text="", finish_reason="length") for _ in prompts]

    monkeypatch.setattr(server.cli, "LLM", FakeLLM)
    argv = ["generate", "--no-enable-prefix-caching", "--block-size", "4", "--num-pages", "64"]
    assert main([*argv, "hi"]) == 0
    assert not built[0].cache.enable_prefix_caching and built[0].cache.block_size == 4


def test_pinned_lora_modules_must_name_startup_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    """A pin on a name that is not loaded at startup ends the command before anything is
    built (the demo's adapters count as startup adapters)."""
    argv = ["serve", "some/model_dir", "--lora-modules", "a=/p", "--pinned-lora-modules", "a", "b"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--pinned-lora-modules names b," in err and "--lora-modules" in err
    assert main(["serve", "--pinned-lora-modules", "nope"]) == 2
    assert "names nope" in capsys.readouterr().err


def test_scheduling_flags_and_pins_reach_the_engine_process() -> None:
    """The scheduling flags and the pinned startup adapters travel in the EngineSpec
    (encoded, decoded); the engine process builds its engine from them and reports its
    policy to the API process."""
    args = parse(
        "--scheduling-policy", "priority", "--fairness-key", "user", "--max-loras", "2",
        "--max-resident-loras", "8", "--pinned-lora-modules", "upper",
    )  # fmt: skip
    assert args.pinned_lora_modules == ["upper"]
    adapters = list(demo_adapters("upper", "swapcase").items())
    spec = engine_spec(args, adapters, args.pinned_lora_modules)
    hello = decode_to_engine(frame(Hello("token", spec))[HEADER_BYTES:])
    assert isinstance(hello, Hello) and hello.spec.pinned_lora_modules == ["upper"]
    engine = build_from_spec(hello.spec)
    scheduler, lora = engine.config.scheduler, engine.config.lora
    assert (scheduler.policy, scheduler.fairness_key) == ("priority", "user")
    assert (lora.max_loras, lora.max_resident_loras) == (2, 8)
    assert engine.adapters.pinned_names() == ["upper"]
    assert engine.stats().pinned_adapters == ["upper"]
    assert engine_info(engine).scheduling_policy == "priority"
