"""Evaluation: judges and metrics, quality measures, attacks."""
