"""What every command sets up first (mcckd_jax.cli.process): one logging configuration that
survives the root handler absl leaves behind and keeps third-party INFO chatter out, and a
transformers that neither reaches a hub nor prints its "PyTorch was not found" advice.

Each case runs in a fresh interpreter: logging and the Hugging Face environment are
process-wide, and the order of imports is what is under test.
"""

import os
import subprocess
import sys

from mcckd_jax.cli import process

# Makes transformers believe PyTorch is not installed, as on a machine with only this package.
WITHOUT_TORCH = """
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = (
    lambda name, *a, **k: None if name == "torch" else _find_spec(name, *a, **k))
"""


def python(code: str) -> subprocess.CompletedProcess:
    # Without the variables go_offline sets: commands run in-process by other tests (their
    # main()) leave them in this process's environment, which subprocesses inherit.
    env = {k: v for k, v in os.environ.items()
           if k not in (*process.OFFLINE_VARIABLES, "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)


def test_info_lines_of_ours_show_after_a_root_handler_was_installed_and_others_stay_quiet():
    done = python("""
import logging
logging.warning("before")  # installs a root handler at WARNING, as absl and others do
import orbax.checkpoint  # noqa: F401
from mcckd_jax.cli import process
process.setup_logging("INFO")
logging.getLogger("mcckd_jax.train.loop").info("ours at info")
logging.getLogger("absl").info("absl at info")
logging.getLogger("orbax.checkpoint").info("orbax at info")
logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
logging.getLogger("absl").warning("absl at warning")
""")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line.split(": ", 1)[1] for line in lines[1:]] == ["ours at info", "absl at warning"]
    assert " INFO mcckd_jax.train.loop: ours at info" in lines[1]


def test_debug_lets_third_party_lines_through():
    done = python("""
from mcckd_jax.cli import process
import logging
process.setup_logging("DEBUG")
logging.getLogger("absl").info("absl at info")
""")
    assert "absl at info" in done.stderr


def test_an_unknown_level_is_a_value_error():
    done = python("from mcckd_jax.cli import process\nprocess.setup_logging('LOUD')")
    assert "ValueError: --log_level: unknown level 'LOUD'" in done.stderr


def test_transformers_gives_no_advice_about_pytorch_after_go_offline():
    advice = "PyTorch was not found"
    control = python(WITHOUT_TORCH + "import transformers\n")
    assert advice in control.stderr  # the message this setup exists to keep out
    done = python(WITHOUT_TORCH + """
from mcckd_jax.cli import process
process.go_offline()
import transformers
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE, "the hub is not offline"
""")
    assert done.returncode == 0, done.stderr
    assert advice not in done.stderr and done.stderr.strip() == ""
