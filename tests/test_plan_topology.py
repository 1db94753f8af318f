"""mcckd-plan's targets: Cloud TPU slice names to libtpu's shapes (v5e/v6e by chips, 2D;
v4/v5p by TensorCores, 3D), GPUs as hosts x GPUs, CPU devices; the environment set before
JAX starts; and the bytes a device holds of a sharded tree, against hand-worked shards."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mcckd_jax.plan import programs, topology


@pytest.mark.parametrize("name, shape", [
    ("v5e-1", (1, 1)), ("v5e-4", (2, 2)), ("v5e-8", (2, 4)), ("v5e-16", (4, 4)),
    ("v5e-32", (4, 8)), ("v5e-256", (16, 16)), ("v6e-8", (2, 4)), ("v5litepod-16", (4, 4)),
    ("v4-8", (2, 2, 1)), ("v4-16", (2, 2, 2)), ("v4-32", (2, 2, 4)), ("v4-64", (2, 4, 4)),
    ("v4-128", (4, 4, 4)), ("v5p-8", (2, 2, 1)), ("v5p-256", (4, 4, 8)),
    ("v5e:2x2", (2, 2)), ("V4:2x2x2", (2, 2, 2)), ("h100:8", (1, 8)), ("h200:4x8", (4, 8)),
    ("cpu:8", (8,)),
])
def test_names_map_to_cloud_tpu_shapes(name, shape):
    assert topology.parse_target(name).shape == shape


def test_a_target_knows_its_chip_and_libtpu_name():
    target = topology.parse_target("v4-16")
    assert (target.platform, target.chips, target.topology_name) == ("tpu", 8, "v4:2x2x2")
    assert target.chip.hbm_bytes == 32 * 2**30 and target.chip.peak_bf16_flops == 275e12
    gpus = topology.parse_target("a100:2x8")
    assert (gpus.platform, gpus.chips, gpus.chip.peak_bf16_flops) == ("gpu", 16, 312e12)


@pytest.mark.parametrize("name, message", [
    ("v5e-6", "power-of-two"), ("v4-9", "multiple of 2"), ("v4-2", "smallest v4 slice"),
    ("v5e:2x2x2", "has 2 sizes"), ("cpu:0", "at least one"), ("tpu-8", "unknown"),
])
def test_bad_names_are_one_line_errors(name, message):
    with pytest.raises(ValueError, match=message) as caught:
        topology.parse_target(name)
    assert str(caught.value).startswith(f"--topology {name}") and "\n" not in str(caught.value)


def test_the_environment_forces_cpu_devices_and_keeps_libtpu_off_the_network():
    env = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=2"}
    topology.prepare_environment(topology.parse_target("cpu:4"), env)
    assert env == {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=4",
                   "JAX_PLATFORMS": "cpu"}
    env = {}
    topology.prepare_environment(topology.parse_target("v5e-8"), env)
    assert env["TPU_SKIP_MDS_QUERY"] == "1" and env["TPU_ACCELERATOR_TYPE"] == "v5e-8"
    assert env["JAX_PLATFORMS"] == "cpu" and env["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"


def test_bytes_per_device_are_the_largest_shard_of_each_leaf():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = jax.sharding.Mesh(devices, ("a", "b"))
    tree = {
        "split_both": jax.ShapeDtypeStruct((64, 32), np.float32,
                                           sharding=NamedSharding(mesh, PartitionSpec("a", "b"))),
        "uneven": jax.ShapeDtypeStruct((10, 3), np.int8,
                                       sharding=NamedSharding(mesh, PartitionSpec("b"))),
        "whole": jax.ShapeDtypeStruct((5,), np.float16,
                                      sharding=NamedSharding(mesh, PartitionSpec())),
    }
    # 32 x 8 float32; ceil(10 / 4) = 3 rows of 3 int8; 5 float16.
    assert programs.per_device_bytes(tree) == 32 * 8 * 4 + 3 * 3 + 5 * 2


def test_the_state_check_that_training_runs_before_reading_weights():
    from mcckd_jax import config as config_lib
    from mcckd_jax import sharding
    from mcckd_jax.plan import report
    from mcckd_jax.train.config import TrainConfig

    config = config_lib.load(TrainConfig, None, ["student.preset=tiny",
                                                 "student.architecture.vocab_size=1000"])
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:2])
    # 82,592 float32 weights and AdamW's two moments (plus its step counts), replicated.
    needed = 3 * 4 * 82_592
    assert report.state_shortfall(config, mesh, needed + 64) is None
    message = report.state_shortfall(config, mesh, needed - 1000)
    assert message.startswith("weights and optimizer state alone need 0.95 MiB per device")
