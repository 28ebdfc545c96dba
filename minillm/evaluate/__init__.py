"""Evaluation: perplexity on non-overlapping windows (and the lm-eval bridge)."""
