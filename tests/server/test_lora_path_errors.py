"""A ``lora_path`` the file system refuses is a 400 that names the problem, never a 500 and
never the path: a name too long, permission denied, a file where a directory should be and
a directory where a file should be, a FIFO (never opened: reading one blocks), a dangling
symlink, a symlink loop. Each bad request is followed by a good one."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import ServerConfig
from tests.server.conftest import (
    BASE,
    Served,
    assert_error,
    assert_good,
    copy_adapter,
    make_engine,
    serve,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# Every bad path starts with this, so a response that echoes one is easy to see.
BAD = "bad-"
LONG_NAME = BAD + "x" * 2000  # one component over NAME_MAX (255)
# Each component fits (244 bytes), the whole does not: 3,124 characters, within the API's
# limit on lora_path (4,096), but 6,124 bytes, over PATH_MAX (4,096 bytes).
LONG_PATH = "/".join([BAD + "é" * 120] * 25)


def _replace(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    """Put what ``make`` creates in place of the adapter's file ``name``."""

    def edit(directory: Path) -> None:
        (directory / name).unlink()
        make(directory / name)

    return edit


def _mkdir(path: Path) -> None:
    path.mkdir()


def _mkfifo(path: Path) -> None:
    os.mkfifo(path)


def _dangling(path: Path) -> None:
    path.symlink_to(path.parent / "gone")  # inside the root, so containment lets it through


def _self_loop(path: Path) -> None:
    path.symlink_to(path)


# directory name → how a copy of the upper adapter is broken
BROKEN_ADAPTERS: dict[str, Callable[[Path], None]] = {
    "config-dir": _replace(CONFIG, _mkdir),
    "weights-dir": _replace(WEIGHTS, _mkdir),
    "config-fifo": _replace(CONFIG, _mkfifo),
    "weights-fifo": _replace(WEIGHTS, _mkfifo),
    "config-dangling": _replace(CONFIG, _dangling),
    "config-loop": _replace(CONFIG, _self_loop),
}

# case → (lora_path, status, code, a fragment of the message); "{root}" is the adapter root
CASES: dict[str, tuple[str, int, str, str]] = {
    "name_over_name_max": (LONG_NAME, 400, "invalid_value", "lora_path is too long"),
    "path_over_path_max": (LONG_PATH, 400, "invalid_value", "lora_path is too long"),
    "absolute_path_over_path_max": (
        "{root}/" + LONG_PATH,
        400,
        "invalid_value",
        "lora_path is too long",
    ),
    "names_a_file": (BAD + "file", 400, "invalid_adapter", "a directory was expected"),
    "file_on_the_way": (BAD + "file/adapter", 400, "invalid_adapter", "a directory was expected"),
    "names_a_fifo": (BAD + "fifo", 400, "invalid_adapter", "not a directory"),
    "config_is_a_directory": (
        BAD + "config-dir",
        400,
        "invalid_adapter",
        f"{CONFIG} is a directory; a file was expected",
    ),
    "weights_is_a_directory": (
        BAD + "weights-dir",
        400,
        "invalid_adapter",
        f"{WEIGHTS} is a directory; a file was expected",
    ),
    "config_is_a_fifo": (
        BAD + "config-fifo",
        400,
        "invalid_adapter",
        f"{CONFIG} is not a regular file",
    ),
    "weights_is_a_fifo": (
        BAD + "weights-fifo",
        400,
        "invalid_adapter",
        f"{WEIGHTS} is not a regular file",
    ),
    "dangling_symlink": (
        BAD + "dangling",
        400,
        "adapter_not_found",
        "lora_path is a dangling symbolic link",
    ),
    "config_dangling_symlink": (
        BAD + "config-dangling",
        400,
        "invalid_adapter",
        f"{CONFIG} is a dangling symbolic link",
    ),
    "symlink_loop": (
        BAD + "loop-a",
        400,
        "invalid_adapter",
        "too many levels of symbolic links",
    ),
    "config_symlink_loop": (
        BAD + "config-loop",
        400,
        "invalid_adapter",
        f"{CONFIG}: too many levels of symbolic links",
    ),
    # As before: nothing there at all.
    "missing": (BAD + "missing", 400, "adapter_not_found", "adapter directory not found"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root with one good adapter and every kind of bad path."""
    root = tmp_path_factory.mktemp("lora-path-errors")
    copy_adapter("upper", root / "good")
    for name, breaker in BROKEN_ADAPTERS.items():
        breaker(copy_adapter("upper", root / (BAD + name)))
    (root / (BAD + "file")).write_text("not a directory")
    os.mkfifo(root / (BAD + "fifo"))
    (root / (BAD + "dangling")).symlink_to(root / "nothing-here")
    (root / (BAD + "loop-a")).symlink_to(root / (BAD + "loop-b"))
    (root / (BAD + "loop-b")).symlink_to(root / (BAD + "loop-a"))
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[Served]:
    config = ServerConfig(model_name=BASE, allow_runtime_lora=True, adapter_roots=(root,))
    served = serve(make_engine(), config)
    yield served
    served.stop()


def load(served: Served, name: str, path: str) -> httpx.Response:
    # A FIFO opened for reading would block the load: the timeout turns that into a failure.
    with served.http(timeout=30) as http:
        return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})


def assert_refused(
    served: Served, root: Path, lora_path: str, status: int, code: str, fragment: str
) -> None:
    """The load is refused with this status, code and message, without the path."""
    response = load(served, "refused", lora_path)
    error = assert_error(response, status, code, "lora_path")
    assert fragment in error["message"], error
    assert BAD not in response.text and str(root) not in response.text  # no path echoed
    assert served.state.engine.adapters.registry.names() == []


def assert_loads(served: Served) -> None:
    """A valid load succeeds, and its unload (the good request after a bad load)."""
    assert load(served, "good", "good").status_code == 200
    with served.http() as http:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "good"}).status_code == 200


@pytest.mark.parametrize("case", CASES)
def test_bad_lora_path_is_a_clear_400(server: Served, root: Path, case: str) -> None:
    lora_path, status, code, fragment = CASES[case]
    assert_refused(server, root, lora_path.format(root=root), status, code, fragment)
    assert_loads(server)
    assert_good(server)


def _deny(real: Callable[..., Any], denied: Callable[[str], bool]) -> Callable[..., Any]:
    """``real``, raising ``PermissionError`` (EACCES) where ``denied(path)``."""

    def call(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, (str, os.PathLike)) and denied(os.fspath(path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *args, **kwargs)

    return call


# case → (the call that fails, the file it fails on within the adapter, the message's fragment)
DENIED: dict[str, tuple[str, str, str]] = {
    "stat_the_directory": ("os.stat", "", "permission denied reading lora_path"),
    "list_the_directory": ("os.scandir", "", "permission denied reading the adapter directory"),
    "open_the_config": ("Path.open", CONFIG, f"permission denied reading {CONFIG}"),
    "open_the_weights": ("Path.open", WEIGHTS, f"cannot read {WEIGHTS} (Permission denied)"),
}


@pytest.mark.parametrize("case", DENIED)
def test_permission_denied_is_a_clear_400(
    server: Served, root: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Permission denied (EACCES) on each call that touches the adapter.

    The tests run as root, which no file mode stops, so the denial is simulated: the one
    call named in ``DENIED`` (``os.stat``, ``os.scandir`` or ``Path.open``) is patched to
    raise ``PermissionError`` for the good adapter's directory or one of its files, and to
    behave as usual for every other path (the server runs in this process). Once the patch
    is gone, the same adapter loads.
    """
    call, file_name, fragment = DENIED[case]
    target = os.path.join(os.path.realpath(root / "good"), file_name).rstrip(os.sep)
    with monkeypatch.context() as patch:
        if call == "Path.open":
            patch.setattr(Path, "open", _deny(Path.open, lambda p: p == target))
        else:
            name = call.removeprefix("os.")
            patch.setattr(os, name, _deny(getattr(os, name), lambda p: p == target))
        response = load(server, "refused", "good")
    error = assert_error(response, 400, "invalid_adapter", "lora_path")
    assert fragment in error["message"], error
    assert str(root) not in response.text
    assert server.state.engine.adapters.registry.names() == []
    assert_loads(server)
    assert_good(server)
