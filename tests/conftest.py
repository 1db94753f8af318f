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

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

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
