"""``/openapi.json``: OpenAPI 3.1, every served route described with the pydantic models that
validate its body, and a fuzzer (schemathesis) over every route of a live ``loraserve
serve`` on the demo, with the admin key and with the user key, that finds no 5xx. A good
request succeeds afterwards. ``benchmarks/fuzz.sh`` is the longer run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31

from server.config import ServerConfig
from server.openapi import OPERATIONS, ErrorResponse, served_routes
from server.request_models import CompletionRequest, LoadLoraRequest
from tests.server.conftest import BASE, Served, assert_error, assert_good, make_engine, serve
from tests.server.live_server import ServeProcess, loraserve

USER, ADMIN = "user-key", "admin-key"
# Examples per route and phase the fuzzer generates for each key (`st run --max-examples`;
# about 10 s a key on 2 cores), and a bound on a run's time that only a hang would reach
# (`--max-time` would repeat the run until it is spent).
FUZZ_EXAMPLES, FUZZ_SECONDS = 8, 180
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance"
CHECKS += ",response_schema_conformance"


@pytest.fixture(scope="module")
def keyed() -> Iterator[Served]:
    """The demo with user and admin keys: every route served."""
    config = ServerConfig(model_name=BASE, api_key=USER, admin_api_key=ADMIN)
    served = serve(make_engine(), config)
    yield served
    served.stop()


def spec_of(served: Served, key: str | None = USER) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with served.http() as http:
        response = http.get("/openapi.json", headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_the_spec_is_behind_the_key(keyed: Served) -> None:
    with keyed.http() as http:
        assert_error(http.get("/openapi.json"), 401, "invalid_api_key")
    assert spec_of(keyed, ADMIN) == spec_of(keyed, USER)
    assert_good(keyed, USER)


def test_the_spec_is_openapi_3_1_and_describes_every_route(keyed: Served) -> None:
    spec = spec_of(keyed)
    jsonschema.Draft202012Validator(OPENAPI_31).validate(spec)
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert described == set(OPERATIONS)  # with keys and runtime loading, every route
    assert served_routes(keyed.server.config.app) == described  # type: ignore[attr-defined]
    for (method, path), op in OPERATIONS.items():
        operation = spec["paths"][path][method.lower()]
        assert {"4XX", "5XX"} <= set(operation["responses"])  # the error envelope
        assert ("security" in operation) != op.open
    assert spec["paths"]["/health"]["get"].get("security") is None


def test_bodies_are_the_models_that_validate_them(keyed: Served) -> None:
    """The published request schemas are the pydantic models' own: strict types, bounds,
    the vLLM extensions; the error schema is the envelope the server sends."""
    schemas = spec_of(keyed)["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    own = CompletionRequest.model_json_schema()["properties"]
    for field in ("n", "temperature", "top_p", "top_k", "priority", "min_tokens", "logprobs"):
        assert completion[field] == own[field], field
    load = schemas["LoadLoraRequest"]
    assert load["properties"]["lora_path"]["maxLength"] == 4096
    assert set(load["required"]) == set(LoadLoraRequest.model_json_schema()["required"])
    body = spec_of(keyed)["paths"]["/v1/load_lora_adapter"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/LoadLoraRequest")
    error = schemas["ErrorResponse"]
    with keyed.http(headers={"Authorization": f"Bearer {USER}"}) as http:
        refused = http.post("/v1/completions", json={"model": BASE, "prompt": "x", "n": 0})
    assert_error(refused, 400, "invalid_value", "n")
    jsonschema.validate(refused.json(), {**error, "$defs": schemas}, cls=_Resolving)
    assert ErrorResponse.model_validate(refused.json())


class _Resolving(jsonschema.Draft202012Validator):  # type: ignore[misc]
    """Resolves the spec's ``#/components/schemas/X`` references against ``$defs``."""

    def __init__(self, schema: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        text = json.dumps(schema).replace("#/components/schemas/", "#/$defs/")
        super().__init__(json.loads(text), *args, **kwargs)


def test_only_the_routes_served_are_described() -> None:
    """No runtime loading: no adapter routes; no key: no security scheme."""
    served = serve(make_engine())
    try:
        spec = spec_of(served, None)
        assert "/v1/load_lora_adapter" not in spec["paths"]
        assert "/v1/completions" in spec["paths"]
        assert "securitySchemes" not in spec["components"]
        assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())
    finally:
        served.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """``loraserve serve`` on the demo, as a user starts it, with both keys, an adapter root
    holding one adapter and an export root: every route is live."""
    top = tmp_path_factory.mktemp("fuzz")
    (top / "root").mkdir()
    (top / "export").mkdir()
    args = ["--api-key", USER, "--admin-api-key", ADMIN, "--adapter-root", str(top / "root")]
    args += ["--export-root", str(top / "export"), "--max-compose-steps", "4"]
    with loraserve(top, *args) as server:
        yield server


@pytest.mark.parametrize("key", [ADMIN, USER], ids=["admin-key", "user-key"])
def test_fuzzing_every_route_finds_no_server_error(
    live: ServeProcess, key: str, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{live.url}/openapi.json"]
    command += ["--header", f"Authorization: Bearer {key}", "--checks", CHECKS]
    command += ["--max-examples", str(FUZZ_EXAMPLES)]
    command += ["--seed", "20261204", "--generation-database", "none", "--workers", "1"]
    command += ["--no-color", "--report", "junit", "--report-dir", str(tmp_path)]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_SECONDS
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "generated" in result.stdout  # it ran cases
    with live.http() as http:
        response = http.post(
            "/v1/completions",
            headers={"Authorization": f"Bearer {USER}"},
            json={"model": BASE, "prompt": "fine=", "max_tokens": 8, "temperature": 0.0},
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "fine"
    assert live.healthy()


# What fuzzing found: integers too large for the engine process's channel (top_k,
# stop_token_ids, max_tokens, token ids and compose's max_steps were a 500), and the fields
# that now take the same 32-bit bound.
FOUND = [
    ("/v1/completions", {"prompt": [2**70]}, "invalid_prompt", "prompt"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**64}, "invalid_value", "top_k"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 2**64}, "invalid_value", "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [2**64]}, "invalid_value",
     "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**64}, "invalid_value", "max_tokens"),
    ("/v1/adapters/compose", {"name": "c", "examples": [{"prompt": "a", "completion": "b"}],
                              "max_steps": -(2**70)}, "invalid_value", "max_steps"),
    ("/v1/adapters/merge", {"name": "m", "adapters": ["upper"], "weights": [1.0],
                            "seed": 2**64}, "invalid_value", "seed"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "code", "param"), FOUND, ids=lambda v: str(v)[:24])
def test_what_fuzzing_found_is_a_400(
    live: ServeProcess, route: str, body: dict[str, Any], code: str, param: str
) -> None:
    with live.http(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        if route == "/v1/completions":
            body = {"model": BASE, **body}
        assert_error(http.post(route, json=body), 400, code, param)
        good = http.post("/v1/completions", json={"model": BASE, "prompt": "ok=", "max_tokens": 4})
    assert good.status_code == 200, good.text


def test_nan_and_infinity_are_no_number(keyed: Served) -> None:
    """JSON has neither, but Python's parser takes them: a field refuses both."""
    with keyed.http(headers={"Authorization": f"Bearer {USER}"}) as http:
        for value in ("NaN", "Infinity", "-Infinity"):
            raw = f'{{"model": "{BASE}", "prompt": "x", "presence_penalty": {value}}}'
            response = http.post(
                "/v1/completions", content=raw, headers={"Content-Type": "application/json"}
            )
            assert_error(response, 400, "invalid_value", "presence_penalty")
    assert_good(keyed, USER)
