"""Decoding and scoring for mcckd-eval."""
