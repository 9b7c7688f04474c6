"""Specialist pools trained from scratch: a shared character tokenizer, next-token SFT, the cached builder."""
