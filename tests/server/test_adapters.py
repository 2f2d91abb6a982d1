"""Adapters through the HTTP routes: every refusal is a 4xx naming what is
wrong (never a 500) followed by a good request; hot loading, unloading in use, churn, bad
loads under traffic, and adapter files that vanish."""

from __future__ import annotations

import json
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import DEMO_DIR
from server.config import ServerConfig
from tests.peft_kinds import make_kind_adapter
from tests.server.conftest import (
    BASE,
    WORDS,
    Served,
    assert_error,
    assert_good,
    complete,
    copy_adapter,
    make_engine,
    serve,
)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_RANK = 16  # the server's --max-lora-rank


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        config = json.loads((directory / CONFIG).read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del config[key]
            else:
                config[key] = value
        (directory / CONFIG).write_text(json.dumps(config))

    return edit


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        tensors = load_file(directory / WEIGHTS)
        change(tensors)
        save_file(tensors, directory / WEIGHTS)

    return edit


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        (directory / name).write_bytes(data)

    return edit


def first_key(tensors: dict[str, torch.Tensor], part: str = "lora_A") -> str:
    return sorted(k for k in tensors if part in k)[0]


def _poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[first_key(tensors)][0, 0] = value

    return change


def _reshape(tensors: dict[str, torch.Tensor]) -> None:
    key = first_key(tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)


def _extra_layer(tensors: dict[str, torch.Tensor]) -> None:
    key = first_key(tensors)
    tensors[key.replace("layers.0.", "layers.99.")] = tensors[key].clone()


_DELETE = object()
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 9\n"
# name → (how to break a copy of the upper adapter, status, code, a fragment of the message)
BAD: dict[str, tuple[Callable[[Path], None], int, str, str]] = {
    "no_config": (lambda d: (d / CONFIG).unlink(), 400, "invalid_adapter", CONFIG),
    "config_not_json": (write(CONFIG, b"{not json"), 400, "invalid_adapter", CONFIG),
    "no_r": (edit_config(r=_DELETE), 400, "invalid_adapter", "r"),
    "no_alpha": (edit_config(lora_alpha=_DELETE), 400, "invalid_adapter", "lora_alpha"),
    "no_targets": (edit_config(target_modules=_DELETE), 400, "invalid_adapter", "target_modules"),
    "r_zero": (edit_config(r=0), 400, "invalid_adapter", "r"),
    "r_negative": (edit_config(r=-4), 400, "invalid_adapter", "r"),
    "not_served": (edit_config(peft_type="LOHA"), 400, "unsupported_adapter_feature", "LOHA"),
    "rank_too_large": (edit_config(r=MAX_RANK * 2), 400, "adapter_rank_too_large", "rank"),
    "dora_no_magnitude": (
        edit_config(use_dora=True),
        400,
        "invalid_adapter",
        "lora_magnitude_vector",
    ),
    "modules_to_save": (
        edit_config(modules_to_save=["lm_head"]),
        400,
        "unsupported_adapter_feature",
        "modules_to_save",
    ),
    "bias": (edit_config(bias="all"), 400, "unsupported_adapter_feature", "bias"),
    "unknown_target": (
        edit_config(target_modules=["nonexistent_proj"]),
        400,
        "invalid_adapter",
        "nonexistent_proj",
    ),
    "extra_key": (edit_tensors(_extra_layer), 400, "invalid_adapter", "layers.99"),
    "bad_shape": (edit_tensors(_reshape), 400, "invalid_adapter", "shape"),
    "r_disagrees": (edit_config(r=2), 400, "invalid_adapter", "rank 2"),
    "truncated": (
        lambda d: write(WEIGHTS, (d / WEIGHTS).read_bytes()[:-64])(d),
        400,
        "invalid_adapter",
        "corrupt",
    ),
    "lfs_pointer": (write(WEIGHTS, LFS), 400, "invalid_adapter", "LFS"),
    "huge_header": (
        write(WEIGHTS, struct.pack("<Q", 1 << 62) + b"{}"),
        400,
        "invalid_adapter",
        "header",
    ),
    "nan": (edit_tensors(_poison(float("nan"))), 400, "invalid_adapter", "NaN"),
    "inf": (edit_tensors(_poison(float("inf"))), 400, "invalid_adapter", "Inf"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name, (breaker, *_) in BAD.items():
        breaker(copy_adapter("upper", root / name))
    copy_adapter("upper", root / "upper")
    copy_adapter("swapcase", root / "swapcase")
    for kind in ("ia3", "dora"):
        make_kind_adapter(DEMO_DIR / "model", root / kind, kind, seed=7, std=0.1)
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[Served]:
    config = ServerConfig(model_name=BASE, allow_runtime_lora=True, adapter_roots=(root,))
    served = serve(make_engine(max_lora_rank=MAX_RANK, max_num_seqs=16), config)
    yield served
    served.stop()


def load(served: Served, name: str, path: str, replace: bool = False) -> httpx.Response:
    body = {"lora_name": name, "lora_path": path, "replace": replace}
    with served.http() as http:
        return http.post("/v1/load_lora_adapter", json=body)


def unload(served: Served, name: str) -> httpx.Response:
    with served.http() as http:
        return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def names(served: Served) -> list[str]:
    return list(served.state.engine.adapters.registry.names())


def long_completion(served: Served, model: str, word: str = "abc") -> str:
    """A completion long enough to span many steps (runs past EOS)."""
    extra = {"ignore_eos": True}
    return complete(served.openai(), model, word, max_tokens=100, extra_body=extra)


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_is_refused(server: Served, root: Path, case: str) -> None:
    _, status, code, fragment = BAD[case]
    before = names(server)
    response = load(server, f"bad-{case}", case)
    error = assert_error(response, status, code or response.json()["error"]["code"], "lora_path")
    assert error["code"] in {"invalid_adapter", "unsupported_adapter_feature", code}
    assert fragment in error["message"], error
    assert str(root) not in response.text  # no server path
    assert names(server) == before
    server.wait_idle()
    assert_good(server)


def test_other_kinds_load_and_serve_as_peft_does(server: Served, root: Path) -> None:
    """An IA³ and a DoRA adapter load through the route, their cards say their kind, and
    a completion is PEFT's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR / "model")
    for kind in ("ia3", "dora"):
        assert load(server, kind, str(root / kind)).status_code == 200
        with server.http() as http:
            cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
        assert cards[kind]["kind"] == kind
        hf = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "model", dtype=torch.float32)
        peft = PeftModel.from_pretrained(hf, root / kind).eval()
        ids = tokenizer("hello=", return_tensors="pt").input_ids
        out = peft.generate(ids, max_new_tokens=8, do_sample=False)
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert complete(server.openai(), kind, "hello", max_tokens=8) == expected
        assert unload(server, kind).status_code == 200
    assert_good(server)


def test_missing_directory_is_400(server: Served) -> None:
    assert_error(load(server, "ghost", "no-such-dir"), 400, "adapter_not_found", "lora_path")
    assert_good(server)


def test_name_conflict_and_replace(server: Served) -> None:
    assert load(server, "dup", "upper").status_code == 200
    assert_error(load(server, "dup", "swapcase"), 409, "adapter_already_loaded", "lora_name")
    assert complete(server.openai(), "dup", "Name") == "NAME"  # unchanged
    assert_error(load(server, BASE, "upper"), 409, "adapter_already_loaded", "lora_name")
    assert load(server, "dup", "swapcase", replace=True).status_code == 200
    assert complete(server.openai(), "dup", "Name") == "nAME"
    assert unload(server, "dup").status_code == 200
    assert_good(server)


def versions(served: Served) -> dict[str, int]:
    """``/v1/models`` as adapter name → version (the base's card carries none)."""
    cards = [c.to_dict() for c in served.openai().models.list().data]
    assert [c["id"] for c in cards if c["parent"] is None] == [BASE]
    assert all("version" not in c for c in cards if c["parent"] is None)
    return {c["id"]: c["version"] for c in cards if c["parent"] is not None}


def test_versions_count_every_load_of_a_name(server: Served) -> None:
    """``replace`` and vLLM's ``load_inplace`` both swap a loaded name's weights as its next
    version; the response and /v1/models say which; unloading and loading again continues
    the count; replacing a name not loaded simply loads it."""
    first = load(server, "ver", "upper")
    assert first.status_code == 200, first.text
    assert first.json()["version"] == 1 and "version 1" in first.json()["message"]
    assert versions(server)["ver"] == 1
    with server.http() as http:
        body = {"lora_name": "ver", "lora_path": "swapcase", "load_inplace": True}
        second = http.post("/v1/load_lora_adapter", json=body)
    assert second.status_code == 200, second.text
    assert second.json()["version"] == 2 and "version 2" in second.json()["message"]
    assert versions(server)["ver"] == 2
    assert complete(server.openai(), "ver", "Name") == "nAME"  # the new weights
    assert_error(load(server, "ver", "upper"), 409, "adapter_already_loaded", "lora_name")
    assert versions(server)["ver"] == 2  # a refused load is no version
    assert unload(server, "ver").status_code == 200
    assert "ver" not in versions(server)
    third = load(server, "ver", "upper", replace=True)  # nothing to replace: a load
    assert third.status_code == 200 and third.json()["version"] == 3, third.text
    assert versions(server)["ver"] == 3
    assert complete(server.openai(), "ver", "Name") == "NAME"
    assert unload(server, "ver").status_code == 200
    server.wait_idle()
    assert_good(server)


def test_load_inplace_must_be_a_boolean(server: Served) -> None:
    with server.http() as http:
        body = {"lora_name": "x", "lora_path": "upper", "load_inplace": "yes"}
        response = http.post("/v1/load_lora_adapter", json=body)
        assert_error(response, 400, "invalid_value", "load_inplace")
    assert_good(server)


def test_unload_unknown_is_404(server: Served) -> None:
    assert_error(unload(server, "never-loaded"), 404, "model_not_found", "lora_name")
    assert_good(server)


def test_unload_in_use_finishes_on_the_old_weights(server: Served) -> None:
    assert load(server, "mut", "swapcase").status_code == 200
    engine = server.state.engine
    old_id = engine.adapters.get("mut").id
    alone_swap = long_completion(server, "mut")
    alone_upper = long_completion(server, "upper") if "upper" in names(server) else None
    stream = server.openai().completions.create(
        model="mut",
        prompt="abc=",
        temperature=0,
        max_tokens=100,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    assert unload(server, "mut").status_code == 200
    assert load(server, "mut", "upper").status_code == 200  # same name, other weights
    after = [chunk.choices[0].text for chunk in chunks]
    assert after, "the request finished before the unload; the test proves nothing"
    assert text + "".join(after) == alone_swap
    new = long_completion(server, "mut")
    assert new.startswith("ABC") and (alone_upper is None or new == alone_upper)
    server.wait_idle()
    assert not server.on_engine(lambda: old_id in engine.adapters.residency)
    assert unload(server, "mut").status_code == 200
    assert_good(server)


def test_concurrent_load_unload_of_one_name(server: Served) -> None:
    def churn(i: int) -> list[int]:
        codes = []
        for j in range(6):
            response = load(server, "race", "upper") if (i + j) % 2 else unload(server, "race")
            codes.append(response.status_code)
        return codes

    with ThreadPoolExecutor(6) as pool:
        codes = [c for batch in pool.map(churn, range(6)) for c in batch]
    assert set(codes) <= {200, 404, 409} and 200 in codes
    if "race" in names(server):
        assert complete(server.openai(), "race", "Race") == "RACE"
        assert unload(server, "race").status_code == 200
    assert "race" not in names(server)
    server.wait_idle()
    assert_good(server)


class Traffic:
    """Good requests in a background thread, checked as they come back."""

    def __init__(self, served: Served, models: list[str]) -> None:
        self.served = served
        self.models = models
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = self.served.openai()
        tasks = {BASE: lambda w: w, "upper": str.upper}
        i = 0
        while not self._stop.is_set():
            model, word = self.models[i % len(self.models)], WORDS[i % len(WORDS)]
            try:
                text = complete(client, model, word)
                if text != tasks[model](word):
                    self.failures.append(f"{model} {word}: {text!r}")
            except Exception as e:
                self.failures.append(f"{model} {word}: {e!r}")
            self.done += 1
            i += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self.failures, self.failures[:5]
        assert self.done > 0


def test_hot_load_serves_at_once_under_traffic(server: Served) -> None:
    traffic = Traffic(server, [BASE])
    try:
        time.sleep(0.1)
        assert load(server, "hot", "swapcase").status_code == 200
        assert complete(server.openai(), "hot", "HotSwap") == "hOTsWAP"
    finally:
        traffic.stop()
    assert unload(server, "hot").status_code == 200


def test_fifty_bad_loads_under_traffic(server: Served) -> None:
    assert load(server, "upper", "upper").status_code in (200, 409)
    traffic = Traffic(server, [BASE, "upper"])
    cases = list(BAD)
    try:
        for i in range(50):
            case = cases[i % len(cases)]
            assert load(server, f"bad{i}", case).status_code == BAD[case][1]
    finally:
        traffic.stop()
    assert load(server, "after-bad", "swapcase").status_code == 200
    assert complete(server.openai(), "after-bad", "Still") == "sTILL"
    assert unload(server, "after-bad").status_code == 200
    server.wait_idle()


def test_adapter_files_deleted_then_needed_again(server: Served, root: Path) -> None:
    shutil.copytree(root / "swapcase", root / "doomed")
    assert load(server, "doomed", "doomed").status_code == 200
    assert complete(server.openai(), "doomed", "Once") == "oNCE"
    shutil.rmtree(root / "doomed")
    engine = server.state.engine

    def evict_everywhere() -> None:  # what memory pressure would do, made deterministic
        entry = engine.adapters.get("doomed")
        if entry.id in engine.adapters.residency:
            engine.adapters.residency.evict(entry.id)
        engine.adapters.host_cache.drop(entry.id)

    server.on_engine(evict_everywhere)
    with server.http() as http:
        body = {"model": "doomed", "prompt": "Twice=", "temperature": 0}
        error = assert_error(http.post("/v1/completions", json=body), 500, "adapter_load_failed")
    assert "doomed" in error["message"] and str(root) not in error["message"]
    assert complete(server.openai(), "upper", "other") == "OTHER"  # everything else continues
    assert_good(server)
    assert unload(server, "doomed").status_code == 200
    server.wait_idle()


def test_metrics_during_churn_are_quick_and_bounded(server: Served) -> None:
    cap = server.state.config.max_metric_adapters
    durations: list[float] = []
    stop = threading.Event()

    def scrape() -> None:
        with server.http() as http:
            while not stop.is_set():
                started = time.monotonic()
                assert http.get("/metrics").status_code == 200
                durations.append(time.monotonic() - started)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        for i in range(cap + 8):
            assert load(server, f"churn{i}", "upper").status_code == 200
            assert complete(server.openai(), f"churn{i}", "c") == "C"
            assert unload(server, f"churn{i}").status_code == 200
    finally:
        stop.set()
        scraper.join(10)
    assert durations and max(durations) < 1.0
    with server.http() as http:
        text = http.get("/metrics").text
    labels = set(re.findall(r'loraserve:adapter_requests_total\{adapter="([^"]+)"\}', text))
    assert "other" in labels and len(labels) <= cap + 1
    assert_good(server)
