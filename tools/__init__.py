"""Command-line entry points (``python -m tools.NAME``): parse arguments, call trainer/, print."""
