"""Evaluation: generation backends, judging, reports."""
