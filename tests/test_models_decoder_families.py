"""Qwen2, Qwen3, Gemma 2 and Gemma 3 students against transformers' PyTorch models.

Tiny random references (float32, random norm weights, a sliding window shorter than the
sequence, soft-capping small enough to matter) built here with a fixed torch seed, loaded
through the registry and the import path, on a one-device and a (2, 2, 2) mesh: logits,
gradients of the MCC-KD loss against torch autograd, greedy decoding against `generate`, and
safetensors out and back in.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_reference as ref
from mcckd_jax import losses, sharding
from mcckd_jax.eval.decoding import SamplingConfig, generate_with_step_count
from mcckd_jax.models import pretrained, registry
from mcckd_jax.models.hf_export import export_hf
from mcckd_jax.models.hf_names import hf_name

SLIDING, FULL = "sliding_attention", "full_attention"
_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=6,
              layer_types=[SLIDING, FULL, SLIDING], pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
REFERENCES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                   tie_word_embeddings=True)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(_GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(_GEMMA, tie_word_embeddings=True, rope_parameters={
                   FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                   SLIDING: {"rope_type": "default", "rope_theta": 1e4}})),
}
FAMILIES = sorted(REFERENCES)


def tiny_hf(family, seed=0):
    config_cls, model_cls, fields = REFERENCES[family]
    config = config_cls(**{**_COMMON, **fields})
    config._attn_implementation = "eager"  # soft-capping is only in the eager path
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random norm weights, so that a mix-up of norms cannot pass
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(-0.5, 0.5) if family.startswith("gemma") else parameter.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=["one_device", "2x2x2"])
def mesh(request):
    if request.param == "one_device":
        return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def hf_model(family):
    return tiny_hf(family, seed=FAMILIES.index(family))


def right_padded(seed, batch=4, length=24):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 96, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    return tokens, mask


def our_logits(model, mesh, tokens, mask=None):
    with sharding.activate(mesh):
        hidden = model(jnp.asarray(tokens),
                       attention_mask_BL=None if mask is None else jnp.asarray(mask))
        return np.asarray(model.logits(hidden))


def test_logits_match_transformers_with_padding_and_windows(family, hf_model, mesh):
    model = ref.load_into_ours(hf_model, mesh)
    assert any(model.config.sliding_layers) and model.config.sliding_window == 6
    tokens, mask = right_padded(1)
    ours = our_logits(model, mesh, tokens, mask)
    expected = ref.hf_logits(hf_model, tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(ours - expected)[valid].max() < 1e-4
    # The window matters here: the same weights without it give other logits.
    unwindowed = ref.load_into_ours(hf_model, mesh, layer_types=None, sliding_window=None)
    assert np.abs(our_logits(unwindowed, mesh, tokens, mask) - expected)[valid].max() > 1e-3


@pytest.mark.parametrize("family", ["gemma2"])
def test_soft_capping_changes_the_logits(family, mesh):
    hf_model = tiny_hf(family, seed=11)
    tokens, mask = right_padded(2)
    expected = ref.hf_logits(hf_model, tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(expected).max() < 3.0  # capped at final_logit_softcapping
    for uncapped in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}):
        model = ref.load_into_ours(hf_model, mesh, **uncapped)
        assert np.abs(our_logits(model, mesh, tokens, mask) - expected)[valid].max() > 1e-3


def mcckd_batch(seed, vocab=96, questions=2, views=3, length=24, span=2):
    """A train batch (README batch contract) with a missing third view in question 1."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (questions, views, length))
    targets = np.roll(tokens, -1, axis=2)
    lengths = np.array([[24, 19, 15], [20, 13, 0]])
    loss_mask = (np.arange(length)[None, None] < lengths[..., None] - 1).astype(np.float32)
    loss_mask[..., :4] = 0  # the prompt
    rationale_mask = (lengths > 0).astype(np.int32)
    span_positions = np.maximum(lengths[..., None] - 2 - np.arange(span)[::-1], 0).astype(np.int32)
    span_mask = np.ones((questions, span), np.int32)
    return dict(tokens=tokens.astype(np.int32), targets=targets.astype(np.int32),
                loss_mask=loss_mask, span_positions=span_positions, span_mask=span_mask,
                rationale_mask=rationale_mask)


def test_mcckd_loss_gradients_match_torch_autograd(family, hf_model, mesh):
    batch = mcckd_batch(3)
    alpha = 0.7
    questions, views, length = batch["tokens"].shape
    hf_model.zero_grad()
    logits = hf_model(input_ids=torch.tensor(batch["tokens"].reshape(-1, length)).long()).logits
    torch_loss = ref.torch_mcc_kd_loss(logits.reshape(questions, views, length, -1),
                                       batch["targets"], batch["loss_mask"],
                                       batch["span_positions"], batch["span_mask"],
                                       batch["rationale_mask"], alpha)
    torch_loss.backward()
    expected = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}
    hf_model.zero_grad()

    model = ref.load_into_ours(hf_model, mesh)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        m = nnx.merge(graphdef, p)
        value, _ = losses.mcc_kd_loss(
            m.batch_hidden(batch), m.output_weight(), batch["targets"], batch["loss_mask"],
            batch["span_positions"], batch["span_mask"], batch["rationale_mask"], alpha=alpha,
            chunk_size=16, logit_softcap=m.final_logit_softcap)
        return value

    with sharding.activate(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(value), float(torch_loss.detach()), rtol=1e-5)
    checked = 0
    for path, variable in nnx.to_flat_state(grads):
        name, transposed = hf_name(path, prefix=model.HF_PREFIX, unprefixed=model.HF_UNPREFIXED)
        got = np.asarray(variable.get_value())
        want = expected[name].T if transposed else expected[name]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
        checked += 1
    assert checked == len(expected)


def test_greedy_decoding_equals_transformers_generate(family, hf_model):
    mesh = sharding.make_mesh((2, 2, 2))
    model = ref.load_into_ours(hf_model, mesh)
    rng = np.random.default_rng(5)
    width, lengths = 12, (9, 4, 12, 1)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    prompts = (rng.integers(3, 96, mask.shape) * mask).astype(np.int32)
    num_new = 14  # prompt + new tokens run well past the window of 6
    with torch.no_grad():
        expected = hf_model.generate(input_ids=torch.tensor(prompts).long(),
                                     attention_mask=torch.tensor(mask).long(),
                                     max_new_tokens=num_new, min_new_tokens=num_new,
                                     do_sample=False, eos_token_id=None,
                                     pad_token_id=0).numpy()[:, width:]
    with sharding.activate(mesh):
        ours, steps = generate_with_step_count(model, prompts, mask,
                                               sampling=SamplingConfig(max_new_tokens=num_new),
                                               eos_token_ids=(), pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours), expected)
    assert int(steps) == num_new - 1


def test_export_loads_in_transformers_and_back_with_the_same_logits(family, hf_model, tmp_path):
    mesh = sharding.make_mesh((2, 2, 2))
    model = ref.load_into_ours(hf_model, mesh)
    out = export_hf(model, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf_model)
    reloaded.config._attn_implementation = "eager"
    tokens, mask = right_padded(4)
    np.testing.assert_array_equal(ref.hf_logits(reloaded, tokens, mask),
                                  ref.hf_logits(hf_model, tokens, mask))
    reimported = pretrained.load_pretrained(out, mesh=mesh)
    assert reimported.config == model.config
    np.testing.assert_array_equal(our_logits(reimported, mesh, tokens, mask),
                                  our_logits(model, mesh, tokens, mask))


@pytest.mark.parametrize("name", FAMILIES)
def test_presets_round_trip_through_their_hf_config(name):
    chosen = registry.family(name)
    for preset in chosen.presets.values():
        config = preset()
        hf_config = config.to_hf()
        assert registry.family_of_model_type(hf_config["model_type"], "test") is chosen
        assert chosen.config_cls.from_hf(hf_config) == config
        # transformers reads it as the same architecture
        reread = transformers.AutoConfig.for_model(**hf_config).to_dict()
        assert chosen.config_cls.from_hf(reread) == config
