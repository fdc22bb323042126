"""The `retro-425m` preset (see retro_jax/config.py). `retro-jax info --config retro-425m`."""

from retro_jax.config import experiment_config


def get_config():
    return experiment_config("retro-425m")
