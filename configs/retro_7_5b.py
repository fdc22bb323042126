"""The `retro-7.5b` preset (see retro_jax/config.py). `retro-jax info --config retro-7.5b`."""

from retro_jax.config import experiment_config


def get_config():
    return experiment_config("retro-7.5b")
