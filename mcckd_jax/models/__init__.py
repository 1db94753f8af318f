"""Flax NNX students (LLaMA-family decoder, T5 encoder-decoder) and Hugging Face conversion."""
