"""Hugging Face checkpoints out: config.json + model.safetensors (sharded above a size).

LoRA adapters are merged first, so the export is a plain model that `transformers` loads.
The directory appears only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from mcckd_jax.models.hf_names import hf_name
from mcckd_jax.models.lora import merge_lora


def _host_array(value: jax.Array) -> np.ndarray:
    if value.is_fully_addressable:
        return np.asarray(jax.device_get(value))
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _hf_tensors(model: nnx.Module, dtype) -> dict[str, np.ndarray]:
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(path, prefix=model.HF_PREFIX, unprefixed=model.HF_UNPREFIXED)
        array = _host_array(variable.get_value())
        array = np.ascontiguousarray(array.T if transposed else array)
        tensors[name] = array.astype(dtype) if dtype is not None else array
    return tensors


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    return shards + [current]


def _write(tensors: dict[str, np.ndarray], config: dict, directory: pathlib.Path,
           max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers reads safetensors files tagged as PyTorch
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / file_name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file_name))
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                 "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def export_hf(model: nnx.Module, out_dir: str | os.PathLike, *,
              max_shard_bytes: int = 5 * 2**30, dtype=None) -> pathlib.Path:
    """Writes `model` (LoRA merged) as a Hugging Face checkpoint directory.

    Args:
      max_shard_bytes: above this the weights are split into numbered files plus an index.
      dtype: cast the weights on export (e.g. ml_dtypes.bfloat16); default: as stored.

    Returns:
      The directory. On several processes all of them gather the weights; process 0 writes.
    """
    out_dir = pathlib.Path(out_dir)
    merged = merge_lora(model)
    tensors = _hf_tensors(merged, dtype)
    config = merged.config.to_hf()
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = np.dtype(dtype).name
    if jax.process_index() != 0:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write(tensors, config, staging, max_shard_bytes)
        previous = out_dir.parent / f".{out_dir.name}.previous-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(previous)
        staging.rename(out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
