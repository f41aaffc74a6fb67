"""Sharing: LoRA export and model cards."""
