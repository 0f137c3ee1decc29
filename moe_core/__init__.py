"""Shared, pure code: model configs, checkpoint loading, model math, tokenizer, demo model."""
