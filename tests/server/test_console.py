"""The operator console in a real browser: headless Chromium, driven by Playwright, against
``loraserve serve`` on the demo with traffic running.

Playwright cannot download its own browser here, so the test uses a Chromium already on the
machine: ``$LORASERVE_CHROMIUM``, else ``chromium`` (Debian's package) or Chrome on the
``PATH``. ``.ci/run`` installs Debian's when it is missing and sets
``LORASERVE_REQUIRE_BROWSER=1``, so in CI a missing browser fails the test; elsewhere the
test is skipped, with a warning saying why.

``$LORASERVE_CONSOLE_SCREENSHOT`` names where the screenshot goes (the README's is
``docs/images/console.png``); by default it lands in the test's temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.config import DEMO_DIR
from server.config import ServerConfig
from server.console_routes import CONSOLE_DIR
from tests.server.conftest import BASE, assert_error, demo_adapters, make_engine, serve
from tests.server.live_server import ServeProcess, loraserve, wait_for

USER_KEY = "console-user-key"
ADMIN_KEY = "console-admin-key"
PLAYGROUND = ("upper", "swapcase", "caesar", "reverse")
PROMPT_WORD = "Hello3"
# The flags the machine's network needs (nothing reaches outside), and a root user's.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# What Chromium itself logs for the refused key: the 401 the test asks for.
REFUSED_KEY_LOG = "status of 401"
SCREENSHOT_HISTORY_S = 20  # seconds of traffic in the charts before the screenshot


def find_chromium() -> str | None:
    given = os.environ.get("LORASERVE_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        message = (
            "NO CHROMIUM ON THIS MACHINE: the console's browser test did not run. "
            "Install one (apt-get install chromium) or set LORASERVE_CHROMIUM."
        )
        if os.environ.get("LORASERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    return path


def demo_task(name: str) -> Callable[[str], str]:
    spec = importlib.util.spec_from_file_location("demo_tasks", DEMO_DIR / "tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn: Callable[[str], str] = getattr(module, "copy" if name == BASE else name)
    return fn


class Traffic:
    """Requests for the demo adapters, a few at a time, until stopped."""

    def __init__(self, server: ServeProcess, models: list[str], workers: int = 3) -> None:
        self.server = server
        self.models = models
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = 0
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {USER_KEY}"}
        with httpx.Client(base_url=self.server.url, timeout=60, headers=headers) as http:
            while not self.stop.is_set():
                body = {
                    "model": rng.choice(self.models),
                    "prompt": "".join(rng.choices("abcXYZ019", k=6)) + "=",
                    "max_tokens": 48,
                    "ignore_eos": True,
                }
                reply = http.post("/v1/completions", json=body)
                if reply.status_code != 200:
                    self.errors.append(reply.text)
                self.done += 1

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """``loraserve serve`` as ``make serve`` runs it (the demo and every demo adapter), with
    a user key and an admin key."""
    demo_adapters(*PLAYGROUND)
    tmp = tmp_path_factory.mktemp("console")
    with loraserve(tmp, "--api-key", USER_KEY, "--admin-api-key", ADMIN_KEY) as served:
        yield served


def samples(page: Any, field: str) -> list[float]:
    values: list[float] = page.evaluate(f"window.consoleState.samples.map(s => s.{field})")
    return values


def span(page: Any) -> float:
    seconds: float = page.evaluate(
        "(s => s.length ? s[s.length - 1].t - s[0].t : 0)(window.consoleState.samples)"
    )
    return seconds


def start_composition(server: ServeProcess) -> str:
    body = {
        "name": "upper-ish",
        "candidates": ["upper", "swapcase"],
        "examples": [{"prompt": f"{w}=", "completion": w.upper()} for w in ("ab", "Cd")],
        "max_steps": 6,
    }
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    reply = httpx.post(server.url + "/v1/adapters/compose", json=body, headers=headers)
    assert reply.status_code == 202, reply.text
    job: str = reply.json()["id"]
    return job


# -- the console's files, served ---------------------------------------------------------


def test_the_page_and_scripts_need_no_key_and_hold_no_data() -> None:
    served = serve(make_engine(), ServerConfig(model_name=BASE, api_key=USER_KEY))
    try:
        with served.http() as http:
            page = http.get("/")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert '<meta name="loraserve-key-required" content="1">' in page.text
            csp = page.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            for name in ("console.js", "console.css"):
                asset = http.get(f"/console/{name}")
                assert asset.status_code == 200
                assert asset.content == (CONSOLE_DIR / name).read_bytes()
            assert_error(http.get("/console/secrets.txt"), 404, "not_found")
            assert_error(http.get("/console/index.html"), 404, "not_found")
            assert_error(http.get("/console/..%2Fauth.py"), 404, "not_found")
            assert_error(http.get("/v1/status"), 401, "invalid_api_key")  # the data is not open
    finally:
        served.stop()


def test_the_console_can_be_turned_off() -> None:
    served = serve(make_engine(), ServerConfig(model_name=BASE, console=False))
    try:
        with served.http() as http:
            assert_error(http.get("/"), 404, "not_found")
            assert_error(http.get("/console/console.js"), 404, "not_found")
    finally:
        served.stop()


# -- the console in a browser -----------------------------------------------------------


@pytest.mark.slow
def test_console_in_a_browser(chromium: str, server: ServeProcess, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    messages: list[tuple[str, str]] = []  # (phase, text) of every console error
    phase = ["wrong key"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1500})
            page.on(
                "console",
                lambda m: messages.append((phase[0], m.text)) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: messages.append((phase[0], f"uncaught: {e}")))
            page.goto(server.url + "/")

            # The key box first; a wrong key shows the error and no data.
            expect(page.locator("#key-panel")).to_be_visible()
            expect(page.locator("#dashboard")).to_be_hidden()
            page.fill("#key-input", "not-the-key")
            page.click("#key-submit")
            expect(page.locator("#key-error")).to_contain_text("refused")
            expect(page.locator("#dashboard")).to_be_hidden()
            assert page.locator("#adapters tbody tr").count() == 0
            assert page.evaluate("window.consoleState.status") is None

            # The admin key opens it, with the admin actions.
            phase[0] = "admin"
            page.fill("#key-input", ADMIN_KEY)
            page.click("#key-submit")
            expect(page.locator("#dashboard")).to_be_visible()
            expect(page.locator("#access")).to_have_text("admin")
            expect(page.locator("#admin-panel")).to_be_visible()
            expect(page.locator("#model-name")).to_have_text(BASE)
            assert page.evaluate("sessionStorage.getItem('loraserve.key')") == ADMIN_KEY
            expect(page.locator("#plan-table")).to_contain_text("tokens of KV, no adapters")

            # Traffic: the KV and adapter series rise from nothing and move.
            assert max(samples(page, "kv")) == 0, "KV pages before any request"
            with Traffic(server, list(PLAYGROUND)) as traffic:
                assert wait_for(lambda: max(samples(page, "kv")) > 0, 30), "no KV in the chart"
                assert wait_for(lambda: max(samples(page, "adapter")) > 0, 30)
                assert wait_for(lambda: len(set(samples(page, "kv"))) >= 3, 30)
                expect(page.locator('#adapters tr[data-name="upper"]')).to_contain_text("pool")
                before = max(samples(page, "adapter"))

                # An adapter loaded through the console's form, then asked for: its pages
                # join the adapter series.
                page.fill("#load-name", "mirror")
                page.fill("#load-path", "reverse")
                page.click("#load-form button[type=submit]")
                expect(page.locator("#admin-result")).to_contain_text("loaded adapter mirror")
                traffic.models.append("mirror")
                assert wait_for(lambda: max(samples(page, "adapter")) > before, 30), (
                    "the loaded adapter's pages never showed"
                )
                expect(page.locator('#adapters tr[data-name="mirror"]')).to_contain_text("pool")

                # A composition job, with its loss history drawn.
                job = start_composition(server)
                card = page.locator(f'.job[data-job="{job}"]')
                expect(card).to_contain_text("succeeded", timeout=60_000)
                expect(card.locator("canvas")).to_be_visible()

                # The playground: base and four adapters, one prompt, side by side.
                wanted = {BASE, *PLAYGROUND}
                for box in page.locator("#pg-models input[data-model]").all():
                    box.set_checked(box.get_attribute("data-model") in wanted)
                page.fill("#pg-prompt", PROMPT_WORD + "=")
                page.click("#pg-run")
                for model in wanted:
                    card = page.locator(f'.output[data-model="{model}"]')
                    expect(card).to_have_attribute("data-state", "done", timeout=30_000)
                    text = card.locator("pre").inner_text()
                    assert text == demo_task(model)(PROMPT_WORD), (model, text)
                    expect(card.locator(".meta")).to_contain_text("temperature 0")
                assert page.locator(".output").count() == len(wanted)

                # Under traffic still; for the README's, with some history in the charts.
                shot = os.environ.get("LORASERVE_CONSOLE_SCREENSHOT")
                if shot:
                    assert wait_for(lambda: span(page) >= SCREENSHOT_HISTORY_S, 30)
                page.screenshot(path=shot or str(tmp_path / "console.png"), full_page=True)
            assert traffic.errors == [], traffic.errors[:3]
            assert traffic.done > 0

            # The user key: the same page without the admin actions.
            phase[0] = "user"
            page.click("#change-key")
            page.fill("#key-input", USER_KEY)
            page.click("#key-submit")
            expect(page.locator("#access")).to_have_text("user")
            expect(page.locator("#admin-panel")).to_be_hidden()
            assert page.locator("#adapters button").count() == 0
        finally:
            browser.close()

    unexpected = [
        (when, text)
        for when, text in messages
        if not (when == "wrong key" and REFUSED_KEY_LOG in text)
    ]
    assert unexpected == [], unexpected
