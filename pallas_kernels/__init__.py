"""Fused Pallas GPU kernels over TurboQuant codes (decode attention, index scoring)."""
