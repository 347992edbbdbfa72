"""Configs and tokenizer files of the real model families, shipped for offline loading."""
