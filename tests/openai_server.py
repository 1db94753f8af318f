"""A real OpenAI-compatible chat-completions server on loopback for the API teacher's tests:
llama-cpp-python's server (`python -m llama_cpp.server`, the `llama-cpp-python[server]` package)
serving a GGUF file, started as a subprocess and stopped with its whole process group.

The server process carries the suite's network guard (tests/network_guard on PYTHONPATH,
MCCKD_BLOCK_NETWORK=1, the same MCCKD_NETWORK_LOG), listens on 127.0.0.1 only, and gets a
short allow-list of environment variables: its settings are pydantic BaseSettings, which read
any variable named like a field (HOST, PORT, MODEL, SEED, VERBOSE, CACHE, API_KEY, ...) and
uvicorn.run() lets $HOST and $PORT override the command line.

Two changes to the stock server, both for the tests' sake:
- OMP_WAIT_POLICY=PASSIVE. llama.cpp's OpenMP threads spin at every barrier; with as many
  threads as cores and one other busy process (the test itself, another job), 100 tokens took
  145-172 s instead of 1.5 s (SmolLM2, 2 cores). Passive waiting: 1.9 s.
- By default the server forgets the previous prompt before each request (`reuse_prompt=False`).
  Stock llama-cpp-python keeps the last prompt's KV cache; when a prompt repeats it evaluates
  only the last prompt token again, whose logits differ slightly from a whole-prompt
  evaluation, so a request's text depends on the request before it (two texts per prompt and
  seed, even greedy at near ties). Without reuse every text depends on the request alone, in
  any order and under concurrent clients (measured); the prompt costs one batch evaluation.

What the server does with a request (llama-cpp-python 0.3.36, measured with SmolLM2-135M):
- `n` is accepted and ignored: one choice, always.
- `seed` makes the text repeatable; no `seed`: the server's seed, then a chain from the last
  seed used. Another build (GGML_NATIVE, another CPU) gives other texts: compare runs, never
  golden strings.
- `usage` counts prompt tokens after the chat template and completion tokens; `finish_reason`
  is "stop" at the end-of-turn token or a `stop` string, "length" at `max_tokens` or n_ctx.
- One request runs at a time; others wait (no 429/503), so a client timeout must cover the
  queue. A prompt longer than n_ctx is a 400.
- Sampling defaults are llama.cpp's, not OpenAI's: top_k=40, min_p=0.05, repeat_penalty=1.1
  on top of temperature/top_p; `extra_body={"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}`
  turns them off. `logit_bias` (token ids as strings) and `logprobs`/`top_logprobs` work.
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

TESTS_DIR = pathlib.Path(__file__).resolve().parent
GUARD_DIR = TESTS_DIR / "network_guard"
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
    ours = [str(GUARD_DIR), str(TESTS_DIR)]  # the guard; this module, for reuse_prompt=False
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p and p not in ours]
    env["PYTHONPATH"] = os.pathsep.join(ours + inherited)
    env["MCCKD_BLOCK_NETWORK"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def serve_without_prompt_reuse() -> None:
    """`python -m llama_cpp.server` with the command line of this process, each generation
    starting from an empty KV cache (run in the server process)."""
    import functools
    import runpy

    import llama_cpp

    generate = llama_cpp.Llama.generate

    @functools.wraps(generate)
    def generate_from_scratch(self, tokens, *args, **kwargs):
        if kwargs.get("reset", True):
            self.reset()  # n_tokens = 0: no prefix match; eval() then clears the KV cache
        return generate(self, tokens, *args, **kwargs)

    llama_cpp.Llama.generate = generate_from_scratch
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


def server_command(gguf_path, port, *, seed, n_ctx, threads, reuse_prompt=False) -> list[str]:
    start = (["-m", "llama_cpp.server"] if reuse_prompt else
             ["-c", "import openai_server; openai_server.serve_without_prompt_reuse()"])
    return [sys.executable, *start, "--model", str(gguf_path),
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
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
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
def llama_cpp_server(gguf_path, *, seed=0, n_ctx=2048, threads=2, reuse_prompt=False,
                     startup_timeout_s=STARTUP_TIMEOUT_S):
    """Serves `gguf_path` on a free 127.0.0.1 port; yields the base URL for the openai client
    (`http://127.0.0.1:PORT/v1`, model name: the file's stem, though the server answers any
    name with its one model). The chat template is the one in the GGUF's metadata. A client
    must not route loopback through a proxy from the environment (httpx, under the openai
    client, honours $NO_PROXY; the suite's network guard refuses any other host).

    Args:
        seed: the server's seed, for requests that bring none (0 means llama-cpp-python's
            default seed). A request's `seed` also becomes the seed that later unseeded
            requests derive theirs from.
        threads: llama.cpp threads for prompt processing and generation (the texts do not
            depend on it); more than the machine's cores only adds overhead.
        reuse_prompt: keep the stock server's prompt cache (see the module docstring).

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
                server_command(gguf_path, port, seed=seed, n_ctx=n_ctx, threads=threads,
                               reuse_prompt=reuse_prompt),
                env=server_environment(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
        try:
            _wait_until_ready(process, base_url, log_path, startup_timeout_s)
            yield base_url
        finally:
            _stop(process)
