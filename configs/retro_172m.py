"""The `retro-172m` preset (see retro_jax/config.py). `retro-jax info --config retro-172m`."""

from retro_jax.config import experiment_config


def get_config():
    return experiment_config("retro-172m")
