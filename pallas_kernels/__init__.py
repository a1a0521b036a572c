"""Pallas GPU kernels, each beside its pure-jnp reference: ragged paged attention, FP8 matmul."""
