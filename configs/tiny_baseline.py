"""tiny-baseline: the tiny decoder without retrieval (no CCA layers, no encoder)."""

from retro_jax.config import baseline_of, load_config


def get_config():
    return baseline_of(load_config("tiny"), "tiny-baseline")
