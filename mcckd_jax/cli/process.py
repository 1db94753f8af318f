"""What every mcckd command sets up in its process before loading anything: no network, and
one logging configuration.

Offline: the Hugging Face libraries read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when they are
first imported, so `go_offline` runs before any of them is. Every load in the package also asks
for local files explicitly; this is the second lock on the same door.

Logging: absl (imported by Orbax and JAX) puts a handler on the root logger when it is
imported, after which `logging.basicConfig` does nothing; `force=True` replaces it. The INFO
chatter of Orbax, absl and JAX (a hundred lines per short run) is held back unless the level
is DEBUG.
"""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CHATTY = ("absl", "orbax", "jax", "jaxlib", "tensorstore", "grain", "datasets", "transformers",
           "huggingface_hub", "urllib3", "filelock", "matplotlib")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def go_offline() -> None:
    """Tells the Hugging Face libraries of this process never to reach a hub, and transformers
    to keep its advice to itself ("PyTorch was not found...": this package uses transformers
    for tokenizers and configs only, which need no PyTorch)."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers' own progress bars (loading weights, reading files); the commands have
    # their own. Set HF_HUB_DISABLE_PROGRESS_BARS=0 to see them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def setup_logging(level: str) -> None:
    """Our loggers at `level` on stderr; third-party loggers at WARNING unless `level` is
    DEBUG (then they follow it)."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"--log_level: unknown level {level!r} (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=numeric, format=LOG_FORMAT, force=True)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else
                                         max(numeric, logging.WARNING))
