"""Sweeps and cluster launches of retro-jax runs (see launch/README.md)."""
