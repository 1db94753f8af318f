"""The table between our parameter paths and Hugging Face tensor names.

Module attributes carry the Hugging Face names, so a path maps to a name by joining it:
("layers", 3, "self_attn", "q_proj", "kernel") <-> "model.layers.3.self_attn.q_proj.weight".
Kernels are stored [in, out] and Hugging Face weights [out, in], hence the transpose flag.
"""

from __future__ import annotations

from collections.abc import Sequence

# Leaf name -> (Hugging Face suffix, transposed). LoRA leaves have no Hugging Face tensor.
_LEAVES = {"kernel": ("weight", True), "embedding": ("weight", False),
           "weight": ("weight", False), "bias": ("bias", False)}
LORA_LEAVES = ("lora_a", "lora_b")


def hf_name(path: Sequence, *, prefix: str, unprefixed: Sequence[str] = ()) -> tuple[str, bool] | None:
    """(Hugging Face tensor name, transposed) for one parameter path; None for LoRA leaves.

    Args:
      prefix: prepended to every name, e.g. "model." for LlamaForCausalLM.
      unprefixed: top-level modules that sit outside the prefix, e.g. ("lm_head",).
    """
    *modules, leaf = (str(part) for part in path)
    if leaf in LORA_LEAVES:
        return None
    if leaf not in _LEAVES:
        raise KeyError(f"no Hugging Face name for parameter {'/'.join(map(str, path))}")
    suffix, transposed = _LEAVES[leaf]
    head = "" if modules and modules[0] in unprefixed else prefix
    return f"{head}{'.'.join(modules)}.{suffix}", transposed
