"""Bundled YAML and JSON configs (the top-level ``configs/`` folder of the repository)."""
