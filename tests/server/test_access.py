"""Access: keys, admin routes, CORS, adapter path containment, pickles and
remote code. Each bad request is followed by a good one."""

from __future__ import annotations

import hmac
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.config import ServerConfig
from tests.server.conftest import (
    BASE,
    Served,
    assert_error,
    assert_good,
    complete,
    copy_adapter,
    demo_adapters,
    make_engine,
    serve,
)

USER, ADMIN = "user-key-123", "admin-key-456"
ALLOWED_ORIGIN = "https://allowed.example"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adapter root holding good and bad adapters, and an outside directory."""
    top = tmp_path_factory.mktemp("access")
    root, outside = top / "root", top / "outside"
    root.mkdir()
    outside.mkdir()
    copy_adapter("upper", root / "good")
    copy_adapter("upper", outside / "secret")
    # A directory whose config is a FIFO: opening it would block the loader forever.
    (outside / "fifo").mkdir()
    os.mkfifo(outside / "fifo" / "adapter_config.json")
    (root / "escape").symlink_to(outside / "fifo")
    (root / "escape_dir").symlink_to(outside / "secret")
    mixed = copy_adapter("upper", root / "mixed")  # one file symlinked out of the root
    (mixed / "adapter_model.safetensors").unlink()
    (mixed / "adapter_model.safetensors").symlink_to(
        outside / "secret" / "adapter_model.safetensors"
    )
    for name, weights in (("pickled", "adapter_model.bin"), ("pt_only", "weights.pt")):
        (root / name).mkdir()
        shutil.copy(demo_adapters("upper")["upper"] / "adapter_config.json", root / name)
        (root / name / weights).write_bytes(b"\x80\x04K\x01.")  # a pickle; never opened
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path]) -> Iterator[Served]:
    config = ServerConfig(
        model_name=BASE,
        api_key=USER,
        admin_api_key=ADMIN,
        adapter_roots=(dirs["root"],),
        cors_origins=(ALLOWED_ORIGIN,),
    )
    served = serve(make_engine(), config)
    yield served
    served.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def load(served: Served, path: str, name: str = "x", key: str = ADMIN) -> httpx.Response:
    with served.http(timeout=10) as http:
        return http.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=auth(key)
        )


REQUESTS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": BASE, "prompt": "a="}),
    (
        "POST",
        "/v1/chat/completions",
        {"model": BASE, "messages": [{"role": "user", "content": "a"}]},
    ),
    ("GET", "/metrics", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "good"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
    ("GET", "/v1/no-such-route", None),
]
BAD_HEADERS = [
    {},
    auth("wrong"),
    auth(USER + "x"),
    auth(USER[:-1]),
    {"Authorization": USER},
    {"Authorization": f"Basic {USER}"},
    {"Authorization": "Bearer"},
]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS)
def test_missing_or_wrong_key_is_401(
    server: Served, method: str, path: str, body: dict[str, object] | None
) -> None:
    with server.http() as http:
        for headers in BAD_HEADERS:
            response = http.request(method, path, json=body, headers=headers)
            assert_error(response, 401, "invalid_api_key")
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert server.state.engine.adapters.registry.names() == []
    assert_good(server, USER)


def test_health_needs_no_key_and_keys_work(server: Served) -> None:
    with server.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models", headers=auth(USER)).status_code == 200
        assert http.get("/metrics", headers=auth(ADMIN)).status_code == 200  # admin ⊇ user
    assert complete(server.openai(ADMIN), BASE, "adm") == "adm"


def test_user_key_on_admin_routes_is_403(server: Served) -> None:
    assert_error(load(server, "good", key=USER), 403, "permission_denied")
    with server.http() as http:
        response = http.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=auth(USER))
    assert_error(response, 403, "permission_denied")
    assert server.state.engine.adapters.registry.names() == []
    assert_good(server, USER)


def test_admin_routes_absent_without_admin_key() -> None:
    served = serve(make_engine(), ServerConfig(model_name=BASE, adapter_roots=(Path("/"),)))
    try:
        with served.http() as http:
            body = {"lora_name": "u", "lora_path": str(demo_adapters("upper")["upper"])}
            assert_error(http.post("/v1/load_lora_adapter", json=body), 404, "not_found")
            assert_error(
                http.post("/v1/unload_lora_adapter", json={"lora_name": "u"}), 404, "not_found"
            )
            # No CORS origins configured: a preflight gets no allow-origin header.
            preflight = http.options(
                "/v1/completions",
                headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"},
            )
            assert "access-control-allow-origin" not in preflight.headers
        assert served.state.engine.adapters.registry.names() == []
        assert_good(served)
    finally:
        served.stop()


def test_cors(server: Served) -> None:
    with server.http() as http:
        for origin in ("https://evil.example", "null", ALLOWED_ORIGIN + ".evil"):
            preflight = http.options(
                "/v1/completions",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            )
            assert "access-control-allow-origin" not in preflight.headers
            assert_error(preflight, 400, "cors_preflight_refused")
            simple = http.get("/v1/models", headers={"Origin": origin, **auth(USER)})
            assert "access-control-allow-origin" not in simple.headers
        preflight = http.options(
            "/v1/completions",
            headers={
                "Origin": ALLOWED_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert_good(server, USER)


def test_lora_path_outside_the_roots(server: Served, dirs: dict[str, Path]) -> None:
    outside, root = dirs["outside"], dirs["root"]
    bad_paths = [
        str(outside / "secret"),  # absolute, outside
        str(outside / "fifo"),  # would block if opened
        "../outside/secret",  # relative with ..
        str(root / ".." / "outside" / "secret"),  # absolute with ..
        str(root / "good" / ".." / "good"),  # .. even when it would land inside
        "escape",  # a symlink inside the root that leads out
        "escape_dir",
        "mixed",  # a directory inside whose weights file links out
        "/etc",
        "good\x00",
    ]
    for path in bad_paths:
        response = load(server, path)
        status = 400 if "\x00" in path else 403
        error = assert_error(
            response,
            status,
            "invalid_value" if status == 400 else "lora_path_not_allowed",
            "lora_path",
        )
        assert str(outside) not in response.text and str(root) not in response.text
        assert "secret" not in error["message"]
    assert server.state.engine.adapters.registry.names() == []
    assert_good(server, USER)


def test_lora_path_inside_a_root_loads(server: Served, dirs: dict[str, Path]) -> None:
    assert load(server, "good", name="inside").status_code == 200
    assert load(server, str(dirs["root"] / "good"), name="inside2").status_code == 200
    client = server.openai(USER)
    assert complete(client, "inside", "path") == "PATH"
    with server.http() as http:
        for name in ("inside", "inside2"):
            body = {"lora_name": name}
            assert (
                http.post("/v1/unload_lora_adapter", json=body, headers=auth(ADMIN)).status_code
                == 200
            )
    assert_good(server, USER)


@pytest.mark.parametrize("name", ["pickled", "pt_only"])
def test_pickle_only_adapters_are_refused(server: Served, name: str) -> None:
    error = assert_error(load(server, name), 400, "pickle_refused", "lora_path")
    assert "pickle" in error["message"]
    assert server.state.engine.adapters.registry.names() == []
    assert_good(server, USER)


def test_remote_code_and_tokenizers_are_never_used(server: Served, dirs: dict[str, Path]) -> None:
    marker = dirs["outside"] / "executed"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    # A valid adapter carrying a tokenizer and code: loads, and only its weights are used.
    extras = copy_adapter("upper", dirs["root"] / "extras")
    (extras / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}, "tokenizer_class": "Tok"})
    )
    (extras / "tokenizer.json").write_text("{not a tokenizer")
    (extras / "evil.py").write_text(code)
    assert load(server, "extras", name="extras").status_code == 200
    assert complete(server.openai(USER), "extras", "tok") == "TOK"
    # A config asking for remote code is refused outright.
    remote = copy_adapter("upper", dirs["root"] / "remote")
    config = json.loads((remote / "adapter_config.json").read_text())
    config["auto_map"] = {"base_model_class": "evil.Model"}
    (remote / "adapter_config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(code)
    error = assert_error(load(server, "remote", name="remote"), 400, "unsupported_adapter_feature")
    assert "auto_map" in error["message"]
    assert not marker.exists()
    assert server.state.engine.adapters.registry.names() == ["extras"]
    assert_good(server, USER)


def test_keys_are_compared_in_constant_time(
    server: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", recording)
    with server.http() as http:
        assert http.get("/v1/models", headers=auth("nope")).status_code == 401
    # Both keys checked, whatever the token (no early exit on the first mismatch).
    assert {key for _, key in calls} == {USER.encode(), ADMIN.encode()}
