"""Evaluation: statistics, image grids (evaluators and reports grow here)."""
