"""Command-line entry points: mcckd-prepare, mcckd-train, mcckd-eval."""
