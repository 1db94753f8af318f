"""Where training metrics go: a progress bar, metrics.jsonl and TensorBoard event files.

Only process 0 writes. Values arrive as plain floats (the loop fetches them from the device
one step late, so logging never stalls the accelerator).
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping

import jax
import tqdm

from mcckd_jax import files, losses

# (label, metrics field) shown in the progress bar: the loss, its terms, the learning rate.
_BAR_FIELDS = (("loss", "loss"), *((term.bar, term.name) for term in losses.TERMS if term.bar),
               ("learning_rate", "learning_rate"))


def _forget_steps_after(jsonl: pathlib.Path, step: int) -> None:
    """Drops the records of steps after `step` from metrics.jsonl: a resumed run replays them
    from its checkpoint, so each step keeps one line (the replay's)."""
    if not jsonl.exists():
        return
    lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
        files.write_atomically(jsonl, "".join(kept))


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a killed process left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _bar_postfix(record: Mapping[str, float]) -> dict[str, str]:
    """The progress bar's fields: losses, learning rate and throughput (positions/s counts
    padding; tok/s real tokens only; loss tok/s the tokens the cross-entropy learns from)."""
    postfix = {label: f"{record[field]:.4g}" for label, field in _BAR_FIELDS if field in record}
    for label, field in (("pos/s", "positions_per_second"), ("tok/s", "real_tokens_per_second"),
                         ("loss tok/s", "loss_tokens_per_second")):
        if field in record:
            postfix[label] = f"{record[field]:.0f}"
    return postfix


class MetricsLogger:
    """Writes one record per logged step; `close()` flushes everything."""

    def __init__(self, output_dir: str | pathlib.Path, *, total_steps: int, start_step: int = 0,
                 progress_bar: bool = True, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.output_dir = pathlib.Path(output_dir)
        self._bar = self._jsonl = self._tensorboard = None
        self._last_time = time.perf_counter()
        self._last_positions = self._last_loss_tokens = self._last_real_tokens = 0.0
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.output_dir / "metrics.jsonl"
        _forget_steps_after(jsonl, start_step)
        self._jsonl = open(jsonl, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

            # purge_step makes TensorBoard drop the events of the steps that are replayed.
            self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard" / "train"),
                                              purge_step=start_step + 1 if start_step else None)
        if progress_bar:
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                                  dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float], positions: float,
            loss_tokens: float, real_tokens: float | None = None) -> dict[str, float]:
        """Records the metrics of `step` (1-based, after the update) and the throughput since
        the previous call; returns the record.

        Args:
          positions: positions computed since the run started (padding and prompts included:
            what the accelerator works on).
          loss_tokens: rationale tokens learned from since the run started (loss_mask).
          real_tokens: non-padding tokens since the run started (prompts, rationales and, for
            encoder-decoder students, encoder tokens: the step's `real_tokens`); None: not
            recorded.
        """
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()},
                  "positions_per_second": (positions - self._last_positions) / elapsed,
                  "loss_tokens_per_second": (loss_tokens - self._last_loss_tokens) / elapsed}
        if positions > self._last_positions:  # of the positions computed, those learned from
            record["loss_share"] = ((loss_tokens - self._last_loss_tokens)
                                    / (positions - self._last_positions))
        if real_tokens is not None:
            record["real_tokens_per_second"] = (real_tokens - self._last_real_tokens) / elapsed
            self._last_real_tokens = real_tokens
        record["time"] = time.time()
        self._last_time, self._last_positions, self._last_loss_tokens = now, positions, loss_tokens
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in record.items():
                if name not in ("step", "time") and math.isfinite(value):
                    self._tensorboard.add_scalar(f"train/{name}", value, step)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(_bar_postfix(record), refresh=False)
            self._bar.refresh()
        return record

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Records evaluation metrics of `step` (a separate metrics.jsonl line)."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "time": time.time()}
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(f"train/{name}", value, step)
        self.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return record

    def message(self, text: str) -> None:
        """A line above the progress bar (or on stdout without one)."""
        if not self.enabled:
            return
        (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        for resource in (self._bar, self._jsonl, self._tensorboard):
            if resource is not None:
                resource.close()
