"""Result files of an evaluation, and the checkpoints kept as best by dev accuracy."""

import json

import grain
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from mcckd_jax import sharding
from mcckd_jax.data.records import Record
from mcckd_jax.eval import reports, scoring
from mcckd_jax.models import pretrained
from mcckd_jax.train import checkpointing, state as train_state

RECORD = Record(question="Tom has 3 apples and buys 4 more. How many apples?", label="7", uid="a")


def results(accuracy_by_name):
    """A one-question result per dataset: correct when the accuracy asked for is 1."""
    out = {}
    for name, (role, correct) in accuracy_by_name.items():
        prediction = scoring.score(RECORD, [f"The answer is {7 if correct else 8}."], "svamp")
        out[name] = ([prediction], {"role": role, **scoring.summarize([prediction])})
    return out


def test_steps_accumulate_and_best_is_chosen_on_dev_only(tmp_path):
    # Step 2: dev right, test wrong; step 4: dev wrong, test right; step 6 = step 2.
    for step, dev_ok, test_ok in ((2, True, False), (4, False, True), (6, True, False)):
        reports.write_step(tmp_path, step, results({"dev": ("dev", dev_ok),
                                                    "gsm": ("test", test_ok)}), {"seed": 0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dataset"], r["accuracy"]) for r in rows] == [
        (2, "dev", 1.0), (2, "gsm", 0.0), (4, "dev", 0.0), (4, "gsm", 1.0),
        (6, "dev", 1.0), (6, "gsm", 0.0)]
    best = json.loads((tmp_path / "best.json").read_text())
    # Never step 4, whose test accuracy is higher; of the tied dev steps, the later.
    assert best == {"step": 6, "dev_accuracy": 1.0, "dev": {"dev": 1.0}, "test": {"gsm": 0.0}}
    lines = (tmp_path / "step_4" / "gsm" / "predictions.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["correct"] is True
    assert reports.evaluated_steps(tmp_path) == {2, 4, 6}
    # Evaluating a step again replaces its lines.
    reports.write_step(tmp_path, 4, results({"dev": ("dev", True), "gsm": ("test", True)}), {})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 6


def test_no_dev_set_no_best(tmp_path):
    reports.write_step(tmp_path, 1, results({"gsm": ("test", True)}), {})
    assert not (tmp_path / "best.json").exists()


def test_checkpointer_keeps_the_latest_and_the_best(tmp_path):
    mesh = sharding.make_mesh((-1, 1, 1))
    model = pretrained.build_student(pretrained.StudentConfig(preset="tiny"), mesh=mesh)
    _, state, _ = train_state.create_train_state(model, optax.sgd(0.1), mesh=mesh)
    checkpointer = checkpointing.Checkpointer(tmp_path, save_every=1, keep=2,
                                              async_save=False, best_metric="dev_accuracy",
                                              keep_best=1)
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    dev_accuracy = {1: 0.2, 2: 0.5, 3: None, 4: 0.1, 5: 0.3, 6: None}  # None: not evaluated
    for step, accuracy in dev_accuracy.items():
        state = train_state.TrainState(step=jnp.asarray(step, jnp.int32), params=state.params,
                                       model_state=state.model_state, opt_state=state.opt_state)
        metrics = {"loss": 1.0} if accuracy is None else {"loss": 1.0, "dev_accuracy": accuracy}
        checkpointer.save(state, data, force=True, metrics=metrics)
    checkpointer.close()
    assert sorted(ocp.utils.checkpoint_steps(tmp_path / "checkpoints")) == [2, 5, 6]
