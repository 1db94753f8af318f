"""Checkpoints round-trip the train state and the Grain iterator, carry SHA-256 digests of every
item file, and nothing is restored from one that fails them.

References: the digests are recomputed here with hashlib over the files on disk; restored
values are compared with the saved arrays and their shardings with the requested ones; damage is made by XOR-flipping 400 bytes in the
middle of one stored file, as a bad disk or a torn copy would.
"""

import hashlib
import json
import logging
import pathlib
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mcckd_jax import sharding
from mcckd_jax.train import checkpointing, digests
from mcckd_jax.train.state import TrainState


def make_state(step: int, scale: float = 1.0) -> TrainState:
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    params = {"w": jax.device_put(scale * jnp.arange(4096, dtype=jnp.float32).reshape(64, 64),
                                  sharded),
              "b": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)}
    opt_state = optax.adam(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + scale if x.dtype == jnp.float32 else x, opt_state)
    return TrainState(step=jnp.int32(step), params=params, model_state={}, opt_state=opt_state)


def shardings_of(state):
    return jax.tree.map(lambda x: x.sharding, state)


def iterator(position: int):
    it = iter(grain.MapDataset.range(1000).to_iter_dataset())
    for _ in range(position):
        next(it)
    return it


def saved_run(directory, *, async_save=True, steps=(2, 4)):
    checkpointer = checkpointing.Checkpointer(directory, save_every=1, keep=5,
                                              async_save=async_save)
    for step in steps:
        checkpointer.save(make_state(step, scale=step), iterator(10 * step), force=True)
    checkpointer.wait()
    checkpointer.close()
    return pathlib.Path(directory) / "checkpoints"


@pytest.fixture(scope="module")
def run_template(tmp_path_factory):
    return saved_run(tmp_path_factory.mktemp("ckpt") / "run").parent


@pytest.fixture
def run_copy(run_template, tmp_path):
    shutil.copytree(run_template, tmp_path / "run")
    return tmp_path / "run"


def flip_bytes(step_dir: pathlib.Path, item: str) -> pathlib.Path:
    """XORs 400 bytes in the middle of the largest data file of `item` (for the Grain item:
    the iterator state, not Orbax's commit marker); returns the file."""
    target = max((p for p in (step_dir / item).rglob("*")
                  if p.is_file() and p.name != "commit_success.txt"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    for i in range(max(0, middle - 200), min(len(data), middle + 200)):
        data[i] ^= 0x5A
    target.write_bytes(bytes(data))
    return target


def restore(run_dir):
    checkpointer = checkpointing.Checkpointer(run_dir, save_every=1)
    template = make_state(0)
    data = iterator(0)
    try:
        restored = checkpointer.restore_latest(template, shardings_of(template), data)
    finally:
        checkpointer.close()
    return restored, data


@pytest.mark.parametrize("async_save", [True, False])
def test_every_item_file_has_its_sha256_in_the_committed_checkpoint(tmp_path, async_save):
    directory = saved_run(tmp_path / "run", async_save=async_save, steps=(3,))
    step_dir = directory / "3"
    record = json.loads((step_dir / digests.DIGESTS_FILE).read_text())
    on_disk = {str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in step_dir.rglob("*") if p.is_file() and p.parent != step_dir}
    recorded = {name: sha for item in record["items"].values() for name, sha in item.items()}
    assert recorded == on_disk
    assert set(record["items"]) == {"params", "optimizer", "data"}
    assert not list(directory.glob("*.orbax-checkpoint-tmp*"))


def test_restore_returns_the_saved_state_and_the_iterator_position(run_copy):
    restored, data = restore(run_copy)
    expected = make_state(4, scale=4)
    assert int(restored.step) == 4
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert restored.params["w"].sharding == expected.params["w"].sharding
    assert next(data) == 40


@pytest.mark.parametrize("item", ["params", "optimizer", "data"])
def test_a_flipped_file_is_set_aside_and_training_resumes_from_the_previous_one(
        run_copy, item, caplog):
    damaged = flip_bytes(run_copy / "checkpoints" / "4", item)
    with caplog.at_level(logging.WARNING, logger="mcckd_jax.train.checkpointing"):
        restored, data = restore(run_copy)
    assert int(restored.step) == 2 and next(data) == 20
    np.testing.assert_array_equal(np.asarray(restored.params["w"]),
                                  np.asarray(make_state(2, scale=2).params["w"]))
    [line] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "checkpoint 4" in line
    assert str(damaged.relative_to(run_copy / "checkpoints" / "4")) in line
    assert "differs from its digest" in line and "resuming from checkpoint 2" in line
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["2"]
    assert [p.name.split("-")[0] for p in (run_copy / "damaged_checkpoints").iterdir()] == ["4"]


@pytest.mark.parametrize("item", ["params", "optimizer", "data"])
def test_evaluation_refuses_a_flipped_checkpoint_and_takes_the_previous_verified_one(
        run_copy, item, caplog):
    flip_bytes(run_copy / "checkpoints" / "4", item)
    template = make_state(0).params
    with caplog.at_level(logging.WARNING, logger="mcckd_jax.train.checkpointing"):
        step, params, _ = checkpointing.restore_params(run_copy, template, {})
    assert step == 2
    np.testing.assert_array_equal(np.asarray(params["b"]), np.asarray(make_state(2).params["b"]))
    [line] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "checkpoint 4" in line and "evaluating checkpoint 2" in line
    with pytest.raises(checkpointing.DamagedCheckpoint, match=r"checkpoint 4 .* is damaged: "):
        checkpointing.restore_params(run_copy, template, {}, step=4)
    assert (run_copy / "checkpoints" / "4").is_dir()  # evaluation never moves a run's files


def test_a_checkpoint_without_digests_is_not_trusted(run_copy):
    (run_copy / "checkpoints" / "4" / digests.DIGESTS_FILE).unlink()
    restored, _ = restore(run_copy)
    assert int(restored.step) == 2


def test_a_truncated_file_and_an_extra_file_fail_verification(run_copy):
    step_dir = run_copy / "checkpoints" / "4"
    assert digests.problem(step_dir) is None
    (step_dir / "params" / "stray").write_bytes(b"x")
    assert digests.problem(step_dir) == f"params/stray is not in its {digests.DIGESTS_FILE}"
    (step_dir / "params" / "stray").unlink()
    target = flip_bytes(step_dir, "optimizer")
    target.write_bytes(target.read_bytes()[:10])
    assert "differs from its digest" in digests.problem(step_dir)
    target.unlink()
    assert digests.problem(step_dir).endswith("is missing")


def test_an_intact_checkpoint_that_does_not_fit_the_state_is_an_error_not_a_fresh_start(
        run_copy):
    template = make_state(0)
    wider = TrainState(step=template.step, params={**template.params, "b": jnp.zeros(65)},
                       model_state={}, opt_state=optax.adam(1e-3).init(
                           {**template.params, "b": jnp.zeros(65)}))
    checkpointer = checkpointing.Checkpointer(run_copy, save_every=1)
    with pytest.raises(checkpointing.IncompatibleCheckpoint,
                       match=r"checkpoint 4 .* intact .* params: shape/dtype of b "
                             r"\(\(64,\), 'float32'\) != \(\(65,\), 'float32'\)"):
        checkpointer.restore_latest(wider, shardings_of(wider), iterator(0))
    checkpointer.close()
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["2", "4"]
    with pytest.raises(checkpointing.IncompatibleCheckpoint, match="unexpected \\['w'\\]"):
        checkpointing.restore_params(run_copy, {"b": template.params["b"]}, {})


def test_restore_puts_every_array_where_the_requested_shardings_say(run_copy):
    # Saved split 2 ways over one axis (and b on one device); restored onto another mesh.
    mesh = sharding.make_mesh((1, 4, 2))
    template = make_state(0)

    def requested(leaf):  # matrices over fsdp x tensor, vectors over tensor, scalars whole
        specs = {2: PartitionSpec("fsdp", "tensor"), 1: PartitionSpec("tensor"),
                 0: PartitionSpec()}
        return NamedSharding(mesh, specs[leaf.ndim])

    wanted = jax.tree.map(requested, template)
    checkpointer = checkpointing.Checkpointer(run_copy, save_every=1)
    try:
        restored = checkpointer.restore_latest(template, wanted, iterator(0))
    finally:
        checkpointer.close()
    expected = make_state(4, scale=4)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want, where in zip(jax.tree.leaves(restored), jax.tree.leaves(expected),
                                jax.tree.leaves(wanted)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == where
    assert restored.params["w"].addressable_shards[0].data.shape == (16, 32)


def test_evaluation_restores_params_into_the_templates_shardings(run_copy):
    mesh = sharding.make_mesh((2, 2, 2))
    w_sharding = NamedSharding(mesh, PartitionSpec(None, ("fsdp", "tensor")))
    b_sharding = NamedSharding(mesh, PartitionSpec("data"))
    template = sharding.abstract_with_shardings(make_state(0).params,
                                                {"w": w_sharding, "b": b_sharding})
    step, params, model_state = checkpointing.restore_params(run_copy, template, {})
    assert step == 4 and model_state == {}
    want = make_state(4, scale=4).params
    for name, where in (("w", w_sharding), ("b", b_sharding)):
        np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(want[name]))
        assert params[name].sharding == where
    assert params["w"].addressable_shards[0].data.shape == (64, 16)
