"""Inference: export trained parameters, load them, generate text with live retrieval."""
