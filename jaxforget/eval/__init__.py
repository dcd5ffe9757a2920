"""Evaluation: judges, metrics, image grids, plots and reports."""
