"""Hugging Face checkpoints in: safetensors (sharded too), PyTorch .bin and GGUF.

Tensors are streamed one at a time from the files straight into sharded device arrays
(`jax.make_array_from_callback`), so host memory holds one tensor beyond the model itself,
and every process of a multi-host job builds only its own shards. The model is created
abstractly first (`nnx.eval_shape`); parameters are never materialised whole on one device.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.models.hf_names import hf_name

NamedTensors = Iterable[tuple[str, np.ndarray]]

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


def _safetensors_tensors(files: list[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                yield name, _torch_to_numpy(reader.get_tensor(name))


def _torch_bin_tensors(files: list[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
    import torch

    for file in files:
        # mmap keeps the file on disk; each tensor is read when converted.
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
        for name in list(state):
            yield name, _torch_to_numpy(state.pop(name))


def _gguf_tensors(file: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers' GGUF reader needs a model to map tensor names; a meta-device one costs nothing.
    hf_config = transformers.AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(hf_config) if not \
            hf_config.is_encoder_decoder else transformers.AutoModelForSeq2SeqLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.float32)["tensors"]
    for name in list(tensors):
        yield name, _torch_to_numpy(tensors.pop(name))


def checkpoint_tensors(path: str | pathlib.Path, gguf_file: str | None = None) -> NamedTensors:
    """(name, array) pairs of a local Hugging Face checkpoint: a directory or a single file."""
    path = pathlib.Path(path)
    if gguf_file is not None or path.suffix == ".gguf":
        return _gguf_tensors(path / gguf_file if gguf_file else path)
    if path.is_file():
        reader = _safetensors_tensors if path.suffix == ".safetensors" else _torch_bin_tensors
        return reader([path])
    for index_name, reader in (("model.safetensors.index.json", _safetensors_tensors),
                               ("pytorch_model.bin.index.json", _torch_bin_tensors)):
        if (path / index_name).exists():
            return reader(_index_files(path, index_name))
    if (path / "model.safetensors").exists():
        return _safetensors_tensors([path / "model.safetensors"])
    if (path / "pytorch_model.bin").exists():
        return _torch_bin_tensors([path / "pytorch_model.bin"])
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json), pytorch_model.bin"
                            "(.index.json) or .gguf file")


def read_hf_config(path: str | pathlib.Path, gguf_file: str | None = None) -> dict:
    """The config.json dict of a checkpoint directory, or the config stored in a GGUF file."""
    path = pathlib.Path(path)
    if gguf_file is not None or path.suffix == ".gguf":
        import transformers

        file = path / gguf_file if gguf_file else path
        return transformers.AutoConfig.from_pretrained(str(file.parent),
                                                       gguf_file=file.name).to_dict()
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(config_file.read_text())


def _concrete_non_base_state(model_factory: Callable[[], nnx.Module]):
    """LoRA adapters and RNG/other state, freshly initialised; base weights are dead code."""
    def init():
        _, lora_state, _, other = nnx.split(model_factory(), nnx.LoRAParam, nnx.Param, ...)
        return lora_state, other
    return jax.jit(init)()


def load_named_tensors(model_factory: Callable[[], nnx.Module], tensors: NamedTensors, *,
                       mesh: jax.sharding.Mesh, rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
                       hf_prefix: str, hf_unprefixed: tuple[str, ...] = (),
                       ignored_names: Callable[[str], bool] = lambda name: False) -> nnx.Module:
    """Builds `model_factory()` with its base weights taken from `tensors`, sharded on `mesh`.

    Raises:
      CheckpointError: a weight is missing, unexpected or of the wrong shape (names them).
    """
    with sharding.activate(mesh, rules):
        abstract = nnx.eval_shape(model_factory)
        graphdef, _, base_abstract, _ = nnx.split(abstract, nnx.LoRAParam, nnx.Param, ...)
        lora_state, other_state = _concrete_non_base_state(model_factory)
        specs = nnx.get_partition_spec(base_abstract)

    targets = {}
    for (path, variable), (_, spec) in zip(nnx.to_flat_state(base_abstract),
                                           nnx.to_flat_state(specs)):
        name, transposed = hf_name(path, prefix=hf_prefix, unprefixed=hf_unprefixed)
        targets[name] = (path, transposed, variable.get_value(), spec.get_value())

    values, unexpected = {}, []
    for name, array in tensors:
        if name not in targets:
            if not (_IGNORED.match(name) or ignored_names(name)):
                unexpected.append(name)
            continue
        path, transposed, abstract_value, spec = targets.pop(name)
        array = array.T if transposed else array
        if array.shape != abstract_value.shape:
            raise CheckpointError(f"tensor {name}: shape {array.shape[::-1] if transposed else array.shape}"
                                  f" does not fit parameter {'/'.join(map(str, path))} "
                                  f"{abstract_value.shape}")
        named_sharding = jax.sharding.NamedSharding(mesh, spec)
        values[path] = jax.make_array_from_callback(
            abstract_value.shape, named_sharding,
            lambda index, a=array, d=abstract_value.dtype: np.asarray(a[index], dtype=d))
    if targets or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {sorted(targets)}, "
                              f"unexpected {sorted(unexpected)}")
    base_state = nnx.from_flat_state([(path, variable.replace(values[path]))
                                      for path, variable in nnx.to_flat_state(base_abstract)])
    return nnx.merge(graphdef, lora_state, base_state, other_state)
