"""Flax NNX decoders (Llama, Gemma 3) that take the KV cache as an argument."""

from models.config import DecoderConfig, gemma3_270m, llama3_8b, smollm2_135m
from models.decoder import Decoder, apply_rope
from models.generate import (SamplingConfig, decode_loop, decode_steps, generate,
                             lazy_greedy_scan, model_step, sample_logits)
