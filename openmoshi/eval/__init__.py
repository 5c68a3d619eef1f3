"""Evaluation: metrics of trained models (codec quality now; LM and dialogue evaluations beside it)."""
