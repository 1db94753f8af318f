"""Command-line entry points: mcckd-prepare, mcckd-train (and mcckd-eval as it arrives)."""
