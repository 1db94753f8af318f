"""mcckd_jax: Multi-CoT Consistent Knowledge Distillation (MCC-KD) in JAX/Flax.

The loss functions live in `mcckd_jax.losses`, which imports nothing else from the package.
"""

__version__ = "0.1.0"
