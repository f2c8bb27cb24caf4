"""Flax decoders (Llama, Gemma) that take the KV cache as an argument."""
