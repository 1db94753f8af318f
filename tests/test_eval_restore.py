"""The eval restore reads a checkpoint's weights (no optimizer) into the student the training
state came from: same logits, with LoRA adapters merged, on a different mesh than training's."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from mcckd_jax import sharding
from mcckd_jax.eval import restore
from mcckd_jax.models import layers, pretrained
from mcckd_jax.train import checkpointing, state as train_state

LORA = layers.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj", "down_proj"))


def logits(model, mesh, tokens_BL):
    with sharding.activate(mesh):
        return np.asarray(model.logits(model(tokens_BL)))


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_restored_student_gives_the_trained_logits(lora, tmp_path):
    train_mesh, eval_mesh = sharding.make_mesh((2, 2, 2)), sharding.make_mesh((1, 4, 2))
    student = pretrained.StudentConfig(preset="tiny", lora=lora, init_seed=3)
    model = pretrained.build_student(student, mesh=train_mesh)
    # Move every trainable weight away from its initial value, so that a restore that fell
    # back to a fresh init (or dropped the adapters) would give other logits.
    rng = np.random.default_rng(0)
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam if lora else nnx.Param)):
        value = variable.get_value()
        variable.set_value(value + jax.device_put(
            rng.normal(0, 0.05, value.shape).astype(np.float32), value.sharding))
    tokens_BL = jnp.asarray(rng.integers(0, model.config.vocab_size, (2, 9)), jnp.int32)
    expected = logits(model, train_mesh, tokens_BL)

    graphdef, state, shardings = train_state.create_train_state(model, optax.adam(1e-3),
                                                                mesh=train_mesh)
    state = train_state.TrainState(step=jnp.asarray(7, jnp.int32), params=state.params,
                                   model_state=state.model_state, opt_state=state.opt_state)
    checkpointer = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=False)
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    assert checkpointer.save(state, data, force=True)
    checkpointer.close()

    step, restored = restore.restore_student(tmp_path, student, mesh=eval_mesh)
    assert step == 7 and restored.config.lora is None  # adapters merged
    kernel = restored.layers[0].self_attn.q_proj.kernel[...]
    assert kernel.sharding.mesh.shape == eval_mesh.shape
    if lora is None:  # read straight into the eval mesh's shardings (no merge in between)
        for path, variable in nnx.to_flat_state(nnx.state(restored, nnx.Param)):
            want = sharding.logical_to_spec(variable.get_metadata()["out_sharding"],
                                            sharding.DEFAULT_RULES)
            assert variable.get_value().sharding == NamedSharding(eval_mesh, want), path
    np.testing.assert_allclose(logits(restored, eval_mesh, tokens_BL), expected, atol=2e-5)


def test_missing_checkpoint_names_the_directory(tmp_path):
    mesh = sharding.make_mesh((-1, 1, 1))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        restore.restore_student(tmp_path, pretrained.StudentConfig(preset="tiny"), mesh=mesh)
