"""Command-line tools around the bundle: ``python -m bundle <command> [--flags]``."""
