"""The pure train step: the same numbers on every mesh, exact accumulation, and the objective."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mcckd_jax import losses, sharding
from mcckd_jax.data import batching
from mcckd_jax.data.tokenization import EncodedDataset
from mcckd_jax.models import decoder, gemma2, layers, llama, t5
from mcckd_jax.train import optimizer as opt
from mcckd_jax.train import state as train_state
from mcckd_jax.train import step as train_step

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]
OPTIMIZER = opt.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, max_grad_norm=None)
TOTAL_STEPS = 10


def random_batch(seed, student, batch=8, views=3, length=12, span=2, vocab=128):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, views, length)).astype(np.int32)
    loss_mask = np.ones((batch, views, length), bool)
    loss_mask[:, :, :4] = False  # the prompt
    loss_mask[1, :, 9:] = False  # a shorter rationale
    rationale_mask = np.ones((batch, views), bool)
    rationale_mask[2, 2] = False
    rationale_mask[3, 1:] = False  # a single-rationale question
    loss_mask &= rationale_mask[:, :, None]
    # As in real data, every rationale of a question ends in the same answer tokens, at a
    # position of its own: the views' span predictions share their targets.
    answers = rng.integers(1, vocab, (batch, span))
    span_positions = np.zeros((batch, views, span), np.int32)
    for k in range(views):
        span_positions[:, k] = 5 + k + np.arange(span)
        tokens[:, k, 6 + k:6 + k + span] = answers
    out = dict(tokens=tokens, targets=np.roll(tokens, -1, axis=2), loss_mask=loss_mask,
               rationale_mask=rationale_mask, span_positions=span_positions,
               span_mask=np.ones((batch, span), bool))
    if student == "t5":
        out["encoder_tokens"] = rng.integers(1, vocab, (batch, 7)).astype(np.int32)
        out["encoder_mask"] = np.ones((batch, 7), bool)
        out["encoder_mask"][0, 5:] = False
    return out


TINY_CONFIGS = {"llama": llama.tiny, "gemma2": gemma2.tiny,
                "t5": lambda **overrides: t5.tiny(**{"vocab_size": 128, **overrides})}


def make_model(student, mesh, **overrides):
    config = TINY_CONFIGS[student](**overrides)
    model_cls = t5.T5Model if student == "t5" else decoder.DecoderModel
    with sharding.activate(mesh):
        return model_cls(config, rngs=nnx.Rngs(0))


def run_steps(student, mesh_shape, num_steps=2, num_micro_batches=1, objective=None,
              batch_seed=0, tx=None, **model_overrides):
    """(metrics per step, final state, initial trainable params as numpy)."""
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    model = make_model(student, mesh, **model_overrides)
    tx = tx or opt.make_optimizer(OPTIMIZER, TOTAL_STEPS)
    graphdef, state, shardings = train_state.create_train_state(model, tx, mesh=mesh)
    initial = jax.tree.map(np.asarray, state.params)
    objective = objective or train_step.ObjectiveConfig(alpha=1.0, chunk_size=16)
    step = train_step.make_train_step(graphdef, tx, objective,
                                      opt.learning_rate_schedule(OPTIMIZER, TOTAL_STEPS),
                                      num_micro_batches)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    batch = jax.device_put(random_batch(batch_seed, student), batch_sharding)
    with sharding.activate(mesh):
        jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, None), donate_argnums=0)
        history = []
        for _ in range(num_steps):
            state, metrics = jitted(state, batch)
            history.append({k: float(v) for k, v in metrics.items()})
    return history, state, initial


@pytest.fixture(scope="module", params=["llama", "t5"])
def reference_run(request):
    # Plain SGD with learning rate 1: the parameter change of the first step is the gradient.
    return request.param, run_steps(request.param, (1, 1, 1), num_steps=1, tx=optax.sgd(1.0))


@pytest.mark.parametrize("mesh_shape", MESHES[1:])
def test_every_mesh_gives_the_single_device_losses_and_gradients(reference_run, mesh_shape):
    student, (expected_history, expected_state, initial) = reference_run
    history, state, _ = run_steps(student, mesh_shape, num_steps=1, tx=optax.sgd(1.0))
    for got, want in zip(history, expected_history):
        for name in ("loss", "ce", "kl", "grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    assert_same_update(state.params, expected_state.params, initial)


def assert_same_update(params, expected_params, initial):
    """After one SGD(1.0) step, the parameters differ from the start by the gradient."""
    for (path, got), (_, want), (_, start) in zip(nnx.to_flat_state(params),
                                                  nnx.to_flat_state(expected_params),
                                                  nnx.to_flat_state(initial)):
        got_delta = np.asarray(got.get_value()) - start.get_value()
        want_delta = np.asarray(want.get_value()) - start.get_value()
        # rtol 1e-5 of each tensor's scale: float32 sums over devices run in another order,
        # and subtracting float32 parameters costs a few ulps of their size.
        rounding = 4 * np.finfo(np.float32).eps * np.abs(start.get_value()).max()
        np.testing.assert_allclose(got_delta, want_delta, rtol=1e-5,
                                   atol=max(1e-5 * np.abs(want_delta).max(), rounding),
                                   err_msg=str(path))


def test_parameters_and_optimizer_moments_are_split_as_the_rules_say():
    _, state, _ = run_steps("llama", (2, 2, 2), num_steps=1)
    params = dict(nnx.to_flat_state(state.params))
    expected = {("layers", 0, "mlp", "gate_proj", "kernel"): P("fsdp", "tensor"),
                ("layers", 1, "self_attn", "o_proj", "kernel"): P("tensor", "fsdp"),
                ("embed_tokens", "embedding"): P("tensor", "fsdp"),
                ("norm", "weight"): P(None)}
    for path, spec in expected.items():
        assert params[path].get_value().sharding.spec == spec, path
    mu = dict(nnx.to_flat_state(optax.tree_utils.tree_get(state.opt_state, "mu")))
    assert mu[("layers", 0, "mlp", "gate_proj", "kernel")].get_value().sharding.spec == P("fsdp", "tensor")
    assert train_state.replicated_fraction(state, sharding.make_mesh((2, 2, 2))) < 0.05


def test_micro_batches_accumulate_to_the_full_batch_step():
    one, state_one, initial = run_steps("llama", (2, 2, 2), num_steps=1, tx=optax.sgd(1.0))
    four, state_four, _ = run_steps("llama", (2, 2, 2), num_steps=1, num_micro_batches=4,
                                    tx=optax.sgd(1.0))
    for name in ("loss", "ce", "kl", "grad_norm", "ce_tokens", "kl_count", "kl_pairs"):
        np.testing.assert_allclose(four[0][name], one[0][name], rtol=1e-5, err_msg=name)
    assert_same_update(state_four.params, state_one.params, initial)


def test_metrics_count_the_batch():
    history, _, _ = run_steps("llama", (1, 1, 1), num_steps=1)
    batch = random_batch(0, "llama")
    assert history[0]["ce_tokens"] == batch["loss_mask"].sum()
    assert history[0]["single_rationale_questions"] == 1.0
    assert history[0]["kl_questions"] == 7.0  # all but the single-rationale question
    assert history[0]["kl_pairs"] == 6 * 3 + 1  # six with 3 views, one with 2
    assert history[0]["learning_rate"] == pytest.approx(OPTIMIZER.learning_rate)


def test_alpha_drives_the_kl_down_while_ce_falls_and_zero_alpha_is_plain_training():
    def train(alpha):
        objective = train_step.ObjectiveConfig(alpha=alpha, chunk_size=16)
        return run_steps("llama", (1, 1, 1), num_steps=12, objective=objective)[0]

    consistent, plain = train(5.0), train(0.0)
    assert consistent[0]["kl"] == pytest.approx(plain[0]["kl"])  # same start
    assert consistent[-1]["kl"] < 0.5 * consistent[0]["kl"]
    assert consistent[-1]["kl"] < 0.5 * plain[-1]["kl"]
    assert consistent[-1]["ce"] < consistent[0]["ce"] and plain[-1]["ce"] < plain[0]["ce"]

    # alpha = 0: the gradient is exactly that of the plain token cross-entropy.
    zero, zero_state, initial = run_steps(
        "llama", (1, 1, 1), num_steps=1, tx=optax.sgd(1.0),
        objective=train_step.ObjectiveConfig(alpha=0.0, chunk_size=16))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, params, rest = nnx.split(make_model("llama", mesh), nnx.Param, ...)
    batch = {k: jnp.asarray(v) for k, v in random_batch(0, "llama").items()}

    def plain_ce(p):
        m = nnx.merge(graphdef, p, rest)
        hidden = m(batch["tokens"].reshape(-1, batch["tokens"].shape[-1]))
        return losses.token_cross_entropy(m.logits(hidden), batch["targets"].reshape(-1, 12),
                                          batch["loss_mask"].reshape(-1, 12))[0]

    loss, grads = jax.value_and_grad(plain_ce)(params)
    np.testing.assert_allclose(zero[0]["loss"], float(loss), rtol=1e-5)
    expected = jax.tree.map(lambda p, g: np.asarray(p) - np.asarray(g), initial, grads)
    assert_same_update(zero_state.params, expected, initial)


def test_lora_trains_only_the_adapters():
    lora = layers.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
    mesh = sharding.make_mesh((2, 2, 2))
    model = make_model("llama", mesh, lora=lora)
    base_before = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])
    _, state, _ = run_steps("llama", (2, 2, 2), num_steps=2, lora=lora)
    names = {path[-1] for path, _ in nnx.to_flat_state(state.params)}
    assert names == {"lora_a", "lora_b"}
    frozen = dict(nnx.to_flat_state(state.model_state))
    np.testing.assert_array_equal(
        np.asarray(frozen[("layers", 0, "self_attn", "q_proj", "kernel")].get_value()), base_before)
    b = dict(nnx.to_flat_state(state.params))[("layers", 0, "self_attn", "q_proj", "lora_b")]
    assert np.abs(np.asarray(b.get_value())).max() > 0


def _rng_counts(state):
    return [int(np.asarray(v.get_value())) for path, v in nnx.to_flat_state(state.model_state)
            if path[-1] == "count"]


@pytest.mark.parametrize("student, overrides", [
    ("t5", dict(dropout_rate=0.2)),
    ("llama", dict(lora=layers.LoRAConfig(rank=2, alpha=4.0, dropout=0.2)))])
def test_dropout_trains_reproducibly_and_advances_its_stream(student, overrides):
    history, state, _ = run_steps(student, (1, 1, 1), num_steps=2, **overrides)
    again, _, _ = run_steps(student, (2, 2, 2), num_steps=2, **overrides)
    plain, _, _ = run_steps(student, (1, 1, 1), num_steps=2)
    assert all(np.isfinite(h["loss"]) for h in history)
    for got, want in zip(again, history):  # the same masks on every mesh
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert abs(history[0]["loss"] - plain[0]["loss"]) > 1e-4  # dropout changed the loss
    assert _rng_counts(state) and min(_rng_counts(state)) >= 2  # advanced at every step


def test_metrics_count_the_real_tokens(reference_run):
    # random_batch: 21 rationale rows (24 less question 2's third and question 3's last two);
    # every row's loss runs to position 11 except question 1's three, which end at 8. T5 adds
    # the encoder tokens: 8 questions x 7, less 2 padding positions of question 0.
    student, (history, _, _) = reference_run
    assert history[0]["real_tokens"] == 18 * 12 + 3 * 9 + (8 * 7 - 2 if student == "t5" else 0)


@pytest.mark.parametrize("layout", ["decoder_only", "encoder_decoder"])
def test_real_tokens_of_a_pipeline_batch_are_its_unpadded_sequences(layout):
    # Question 0: prompt [10 11 12], rationales [20 21 22 EOS], [30 22 EOS]; question 1: prompt
    # [13], rationale [40 41 42 43 EOS]. Pad 0, which is also T5's decoder start token.
    data = EncodedDataset(
        layout=layout, pad_id=0, decoder_start_id=0,
        prompt_tokens=np.array([10, 11, 12, 13], np.int32), prompt_offsets=np.array([0, 3, 4]),
        rationale_tokens=np.array([20, 21, 22, 2, 30, 22, 2, 40, 41, 42, 43, 2], np.int32),
        rationale_offsets=np.array([0, 4, 7, 12]), question_rationales=np.array([0, 2, 3]),
        span_start=np.array([2, 1, 2]), span_tokens=np.array([22, 42, 43], np.int32),
        span_offsets=np.array([0, 1, 3]), record_index=np.array([0, 1]))
    encoder = layout == "encoder_decoder"
    batch = batching.build_train_batch(data, [1, 0, -1], [[2], [1, 0], []], num_rationales=2,
                                       length=8, span_length=3,
                                       encoder_length=5 if encoder else None)
    # Every input position of every rationale (prompt or decoder start, then the rationale
    # less its EOS), and on the encoder side each question's prompt.
    expected = data.sequence_lengths().sum() + (4 if encoder else 0)
    assert float(train_step.real_token_count(batch)) == expected == 16


def test_a_soft_capped_student_learns_from_its_capped_logits():
    # initializer_range 0.5 gives logits of scale ~3, which a cap of 1 changes a lot.
    overrides = dict(final_logit_softcapping=1.0, initializer_range=0.5)
    alpha = 0.5
    history, state, initial = run_steps(
        "gemma2", (1, 1, 1), num_steps=1, tx=optax.sgd(1.0),
        objective=train_step.ObjectiveConfig(alpha=alpha, chunk_size=16), **overrides)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = make_model("gemma2", mesh, **overrides)
    assert model.final_logit_softcap == 1.0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {k: jnp.asarray(v) for k, v in random_batch(0, "gemma2").items()}

    def plain_loss(p, capped=True):  # the model's own full logits, capped by the model
        m = nnx.merge(graphdef, p, rest)
        hidden_BKLD = m.batch_hidden(batch)
        logits_BKLV = (m.logits(hidden_BKLD) if capped else
                       layers.project_to_vocab(hidden_BKLD, m.output_weight()))
        ce, _ = losses.token_cross_entropy(logits_BKLV, batch["targets"], batch["loss_mask"])
        span_BKSV = jnp.take_along_axis(logits_BKLV, batch["span_positions"][..., None], axis=2)
        kl, _ = losses.answer_consistency_kl(span_BKSV, batch["span_mask"],
                                             batch["rationale_mask"])
        return ce + alpha * kl

    loss, grads = jax.value_and_grad(plain_loss)(params)
    np.testing.assert_allclose(history[0]["loss"], float(loss), rtol=1e-5)
    assert abs(float(plain_loss(params, capped=False)) - float(loss)) > 1e-2 * float(loss)
    expected = jax.tree.map(lambda p, g: np.asarray(p) - np.asarray(g), initial, grads)
    assert_same_update(state.params, expected, initial)
