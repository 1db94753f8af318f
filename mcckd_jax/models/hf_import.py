"""Hugging Face checkpoints in: safetensors (sharded too), PyTorch .bin and GGUF.

Tensors are read lazily: each device shard of each parameter is sliced straight out of the
memory-mapped file (`jax.make_array_from_callback` + safetensors' `get_slice`), so host memory
never holds a second copy of the model, and every process of a multi-host job reads only its
own shards. The model is created abstractly first (`nnx.eval_shape`); parameters are never
materialised whole on one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.models.construct import abstract_model, build_with_base_weights
from mcckd_jax.models.hf_names import hf_name



@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A checkpoint tensor that is read slice by slice, in its stored (Hugging Face) layout."""

    shape: tuple[int, ...]
    read: Callable[[tuple[slice, ...]], np.ndarray]

    @classmethod
    def of(cls, array: np.ndarray) -> "LazyTensor":
        return cls(tuple(array.shape), lambda index: np.asarray(array[index]))


NamedTensors = Iterable[tuple[str, "LazyTensor | np.ndarray"]]

# Buffers that some checkpoints carry and that are recomputed here.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch  # only for reading PyTorch-format files

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; keep the bits
        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _index_files(directory: pathlib.Path, index_name: str) -> list[pathlib.Path]:
    index = json.loads((directory / index_name).read_text())
    return [directory / name for name in dict.fromkeys(index["weight_map"].values())]


def _safetensors_tensors(files: list[pathlib.Path],
                        stack: contextlib.ExitStack) -> Iterator[tuple[str, LazyTensor]]:
    from safetensors import safe_open

    for file in files:
        reader = stack.enter_context(safe_open(str(file), framework="numpy"))
        for name in reader.keys():
            tensor_slice = reader.get_slice(name)
            yield name, LazyTensor(tuple(tensor_slice.get_shape()),
                                   lambda index, t=tensor_slice: np.asarray(t[index]))


def _torch_bin_tensors(files: list[pathlib.Path],
                       stack: contextlib.ExitStack) -> Iterator[tuple[str, LazyTensor]]:
    import torch

    del stack  # torch keeps its memory maps alive through the tensors
    for file in files:
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
        for name, tensor in state.items():
            yield name, LazyTensor(tuple(tensor.shape),
                                   lambda index, t=tensor: _torch_to_numpy(t[index]))


def _gguf_tensors(file: pathlib.Path, stack: contextlib.ExitStack) -> Iterator[tuple[str, LazyTensor]]:
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    del stack
    # transformers dequantizes the whole file (one host copy); its name mapping needs a model,
    # and one on the meta device costs nothing.
    hf_config = _gguf_config(file)
    auto = (transformers.AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder
            else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        skeleton = auto.from_config(hf_config)
    # transformers draws a tqdm bar over the tensors on stderr (no switch turns it off alone);
    # the commands show their own progress. Exceptions still propagate.
    with contextlib.redirect_stderr(io.StringIO()):
        tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=skeleton,
                                       torch_dtype=torch.float32)["tensors"]
    for name, tensor in tensors.items():
        yield name, LazyTensor.of(tensor.numpy())


def checkpoint_tensors(path: str | pathlib.Path, stack: contextlib.ExitStack,
                       gguf_file: str | None = None) -> NamedTensors:
    """(name, LazyTensor) pairs of a local Hugging Face checkpoint (a directory or one file);
    the files stay open until `stack` closes."""
    path = _existing(path, gguf_file)
    if gguf_file is not None or path.suffix == ".gguf":
        return _gguf_tensors(path / gguf_file if gguf_file else path, stack)
    if path.is_file():
        reader = _safetensors_tensors if path.suffix == ".safetensors" else _torch_bin_tensors
        return reader([path], stack)
    for index_name, reader in (("model.safetensors.index.json", _safetensors_tensors),
                               ("pytorch_model.bin.index.json", _torch_bin_tensors)):
        if (path / index_name).exists():
            return reader(_index_files(path, index_name), stack)
    if (path / "model.safetensors").exists():
        return _safetensors_tensors([path / "model.safetensors"], stack)
    if (path / "pytorch_model.bin").exists():
        return _torch_bin_tensors([path / "pytorch_model.bin"], stack)
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json), pytorch_model.bin"
                            "(.index.json) or .gguf file")


def read_hf_config(path: str | pathlib.Path, gguf_file: str | None = None) -> dict:
    """The config.json dict of a checkpoint directory, or the config stored in a GGUF file."""
    path = _existing(path, gguf_file)
    if gguf_file is not None or path.suffix == ".gguf":
        return _gguf_config(path / gguf_file if gguf_file else path).to_dict()
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file (a checkpoint directory holds "
                                "config.json beside its weights)")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_file}: not a JSON config ({error})") from None


def _gguf_config(file: pathlib.Path):
    """The transformers config stored in a GGUF file (do not modify it: it is shared)."""
    stat = file.stat()
    return _gguf_config_cached(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _gguf_config_cached(file: str, size: int, mtime_ns: int):
    """Keyed by size and modification time too, so that a rewritten file is read again.
    Reading the metadata parses the whole header (the vocabulary included): seconds per call,
    and loading a student asks for the config three times."""
    del size, mtime_ns
    import transformers

    folder, name = os.path.split(file)
    return transformers.AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)


def _existing(path: str | pathlib.Path, gguf_file: str | None) -> pathlib.Path:
    """`path` (and the GGUF file in it), or FileNotFoundError naming what is missing: a
    checkpoint is a local path, never a hub name; nothing is downloaded."""
    path = pathlib.Path(path)
    file = path / gguf_file if gguf_file else path
    if not file.exists():
        raise FileNotFoundError(
            f"{file}: no such checkpoint file or directory (checkpoints are read from local "
            "paths only; download hub models yourself, e.g. with `huggingface-cli download`)")
    return path


def load_named_tensors(model_factory: Callable[[], nnx.Module], tensors: NamedTensors, *,
                       mesh: jax.sharding.Mesh, rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
                       hf_prefix: str, hf_unprefixed: tuple[str, ...] = (),
                       ignored_names: Callable[[str], bool] = lambda name: False) -> nnx.Module:
    """Builds `model_factory()` with its base weights taken from `tensors`, sharded on `mesh`.

    LoRA adapters (absent from Hugging Face checkpoints) keep their fresh initialisation.

    Raises:
      CheckpointError: a weight is missing, unexpected or of the wrong shape (names them).
    """
    abstract = abstract_model(model_factory, mesh=mesh, rules=rules)
    _, base_abstract = abstract
    targets = {}
    for path, variable in nnx.to_flat_state(base_abstract):
        name, transposed = hf_name(path, prefix=hf_prefix, unprefixed=hf_unprefixed)
        targets[name] = (path, transposed, variable.get_value().shape)

    lazy_tensors, unexpected = {}, []
    for name, tensor in tensors:
        if name not in targets:
            if not (_IGNORED.match(name) or ignored_names(name)):
                unexpected.append(name)
            continue
        tensor = tensor if isinstance(tensor, LazyTensor) else LazyTensor.of(tensor)
        path, transposed, shape = targets.pop(name)
        if (tensor.shape[::-1] if transposed else tensor.shape) != shape:
            raise CheckpointError(f"tensor {name}: shape {tensor.shape} does not fit parameter "
                                  f"{'/'.join(map(str, path))} {shape} (transposed: {transposed})")
        lazy_tensors[path] = (tensor, transposed)
    if targets or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {sorted(targets)}, "
                              f"unexpected {sorted(unexpected)}")

    def device_value(path, abstract, spec):
        tensor, transposed = lazy_tensors.pop(path)

        def read_shard(index):
            if transposed:  # our [in, out] shard is the transpose of a stored [out, in] slice
                return np.asarray(tensor.read(tuple(index[::-1])).T, dtype=abstract.dtype)
            return np.asarray(tensor.read(tuple(index)), dtype=abstract.dtype)

        return jax.make_array_from_callback(abstract.shape,
                                            jax.sharding.NamedSharding(mesh, spec), read_shard)

    return build_with_base_weights(model_factory, device_value, mesh=mesh, rules=rules,
                                   abstract=abstract)
