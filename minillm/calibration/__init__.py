"""Calibration: text loading and sampling, forward hooks, running activation statistics."""
