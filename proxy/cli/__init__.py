"""Command line: argparse verbs (run, validate, demo, status, rollout commands); the only place that exits."""
