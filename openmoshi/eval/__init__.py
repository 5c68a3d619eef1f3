"""Evaluation of trained models (codec, LM, dialogue)."""
