"""mcckd-plan: the memory and FLOPs of a config's train step and eval decoding on a target
(a TPU topology compiled deviceless, or CPU devices) without the hardware or the weights."""
