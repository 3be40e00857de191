"""Metrics, the evaluate stage and the listening report."""
