"""Evaluation with local, long-term and external memory (`trime-eval`)."""
