"""Command-line entry points: mcckd-prepare (and, as they arrive, mcckd-train, mcckd-eval)."""
