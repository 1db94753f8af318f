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

# Compilation dominates test time on CPU; a persistent cache makes reruns cheap.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MCCKD_JAX_CACHE", str(REPO_ROOT / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def shared_dir() -> pathlib.Path:
    """The shared folder beside the repository: $MCCKD_SHARED, default ../shared."""
    return pathlib.Path(os.environ.get("MCCKD_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path of shared/data; skips when it is absent unless MCCKD_REQUIRE_SHARED=1."""
    data = shared_dir() / "data"
    if not data.is_dir():
        reason = (f"shared data not found at {data} (set MCCKD_SHARED to the folder that "
                  "holds data/)")
        if os.environ.get("MCCKD_REQUIRE_SHARED") == "1":
            pytest.fail(f"{reason}; MCCKD_REQUIRE_SHARED=1 makes this an error")
        pytest.skip(reason)
    return data


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
