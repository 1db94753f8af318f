"""Command-line entry points: mcckd-demo-data, mcckd-prepare, mcckd-train, mcckd-eval, mcckd-plot."""
