"""A real OpenAI-compatible chat-completions server on loopback for the API teacher's tests:
llama-cpp-python's server (`python -m llama_cpp.server`, the `llama-cpp-python[server]` package)
serving a GGUF file, started as a subprocess and stopped with its whole process group.

The server process carries the suite's network guard (tests/network_guard on PYTHONPATH,
MCCKD_BLOCK_NETWORK=1, the same MCCKD_NETWORK_LOG), listens on 127.0.0.1 only, and gets a
short allow-list of environment variables: its settings are pydantic BaseSettings, which read
any variable named like a field (HOST, PORT, MODEL, SEED, VERBOSE, CACHE, API_KEY, ...) and
uvicorn.run() lets $HOST and $PORT override the command line.

What the server does with a request (llama-cpp-python 0.3.36, measured; see the report in the
issue): `n` is accepted and ignored (one choice); a request `seed` makes the text repeatable;
one request runs at a time, later ones queue; its sampling defaults are not OpenAI's (top_k=40,
min_p=0.05, repeat_penalty=1.1; pass `extra_body` to change them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

GUARD_DIR = pathlib.Path(__file__).resolve().parent / "network_guard"
STARTUP_TIMEOUT_S = 120.0
# Variables the server process may inherit; every other one could be read as a server setting.
_KEPT_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "TEMP", "TMP", "LD_LIBRARY_PATH", "SYSTEMROOT")
_KEPT_ENV_PREFIXES = ("LC_", "MCCKD_", "OPENBLAS_")
# What `pip install "llama-cpp-python[server]"` brings besides llama_cpp itself.
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context",
                   "pydantic_settings")


class ServerUnavailable(RuntimeError):
    """llama-cpp-python's server is not installed, or did not start."""


def require_server_package() -> None:
    """Raises ServerUnavailable unless `python -m llama_cpp.server` can run in this venv
    (checked without importing llama_cpp, which loads its shared library)."""
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServerUnavailable(
            f"llama-cpp-python's server is not installed in {sys.prefix} (missing: "
            f"{', '.join(missing)}); install it with pip install \"llama-cpp-python[server]\" "
            "(a source build, see README)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_environment() -> dict[str, str]:
    """The server's environment: the allow-list, with the network guard on."""
    env = {k: v for k, v in os.environ.items()
           if k in _KEPT_ENV or k.startswith(_KEPT_ENV_PREFIXES)}
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(GUARD_DIR)] + [p for p in inherited
                                                             if p != str(GUARD_DIR)])
    env["MCCKD_BLOCK_NETWORK"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def server_command(gguf_path, port, *, seed, n_ctx, threads) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path),
            "--model_alias", pathlib.Path(gguf_path).stem, "--host", "127.0.0.1",
            "--port", str(port), "--seed", str(seed), "--n_ctx", str(n_ctx),
            "--n_threads", str(threads), "--n_threads_batch", str(threads)]


def _models(base_url: str):
    """The server's GET /v1/models, without any proxy from the environment; None while it
    does not answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{base_url}/models", timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _tail(log_path: pathlib.Path, chars=3000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no output)"


def _wait_until_ready(process, base_url, log_path, timeout_s) -> None:
    deadline = time.monotonic() + timeout_s
    while _models(base_url) is None:
        if process.poll() is not None:
            raise ServerUnavailable(f"llama_cpp.server exited with {process.returncode} before "
                                    f"answering {base_url}/models; its output:\n"
                                    f"{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"llama_cpp.server did not answer {base_url}/models within "
                                    f"{timeout_s:.0f} s; its output:\n{_tail(log_path)}")
        time.sleep(0.25)


def _stop(process) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextlib.contextmanager
def llama_cpp_server(gguf_path, *, seed=0, n_ctx=2048, threads=2,
                     startup_timeout_s=STARTUP_TIMEOUT_S):
    """Serves `gguf_path` on a free 127.0.0.1 port; yields the base URL for the openai client
    (`http://127.0.0.1:PORT/v1`, model name: the file's stem, though the server answers any
    name with its one model). The chat template is the one in the GGUF's metadata.

    Args:
        seed: the server's seed, used for requests that bring none (llama-cpp-python treats
            0 as its default seed). A request's `seed` replaces it for that request.
        threads: llama.cpp threads for prompt processing and generation.

    Raises:
        ServerUnavailable: the server package is missing, or the server exited or stayed
            silent for `startup_timeout_s` (with the tail of its output).
    """
    require_server_package()
    if not pathlib.Path(gguf_path).is_file():
        raise FileNotFoundError(gguf_path)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryDirectory(prefix="llama-cpp-server-") as folder:
        log_path = pathlib.Path(folder) / "server.log"
        # Output goes to a file, not a pipe: a verbose server that nobody reads would block
        # once the pipe's buffer is full.
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                server_command(gguf_path, port, seed=seed, n_ctx=n_ctx, threads=threads),
                env=server_environment(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
        try:
            _wait_until_ready(process, base_url, log_path, startup_timeout_s)
            yield base_url
        finally:
            _stop(process)
