"""The XLA options the project compiles its train step with: the installed jaxlib accepts
them, they do what they are there for (on the CPU backend YNNPACK takes the matmuls and
nothing else), and the step they compile computes what the plain compilation does.

The function compiled here has the operations the option is about: matmuls, a row-wise
logsumexp over a wide vocabulary (the cross-entropy's reduction) and an RMS norm.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mcckd_jax.train import compilation


def loss(weight_DV, hidden_ND):
    normed = hidden_ND * jax.lax.rsqrt(jnp.mean(hidden_ND * hidden_ND, -1, keepdims=True) + 1e-6)
    logits = normed @ weight_DV
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


def arguments():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    weight = jax.random.normal(jax.random.key(0), (64, 4096)) * 0.1
    hidden = jax.device_put(jax.random.normal(jax.random.key(1), (64, 64)),
                            NamedSharding(mesh, PartitionSpec("data")))
    return weight, hidden


def ynn_fusion_bodies(hlo: str) -> list[str]:
    """The fused computations that XLA hands to YNNPACK."""
    bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S))
    called = re.findall(r"calls=%?([\w.\-]+)[^\n]*__ynn_fusion", hlo)
    return [bodies[name] for name in called]


def test_the_cpu_options_are_accepted_and_leave_only_matmuls_to_ynnpack():
    step = jax.jit(jax.value_and_grad(loss))
    compiled = compilation.compile_train_step(step, *arguments())  # raises if not accepted
    bodies = ynn_fusion_bodies(compiled.as_text())
    assert bodies, "no matmul went to YNNPACK: re-measure the option (benchmarks/mcckd_step.py)"
    assert all(" dot(" in body for body in bodies)


def test_an_option_the_jaxlib_does_not_know_fails_the_compilation():
    # The check above is only worth something if a misspelt option is an error, not a no-op.
    step = jax.jit(loss)
    with pytest.raises(Exception, match="xla_cpu_experimental_ynn_fusion_type"):
        step.lower(*arguments()).compile(
            compiler_options={"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOTS"})


def test_the_options_change_no_result():
    step = jax.jit(jax.value_and_grad(loss))
    args = arguments()
    value, grad = compilation.compile_train_step(step, *args)(*args)
    expected_value, expected_grad = step.lower(*args).compile()(*args)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_only_the_cpu_gets_cpu_options():
    assert compilation.train_step_options("cpu") == dict(compilation.CPU_TRAIN_STEP_OPTIONS)
    assert compilation.train_step_options("tpu") == {} == compilation.train_step_options("gpu")
