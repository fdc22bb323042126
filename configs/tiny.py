"""The `tiny` preset (see retro_jax/config.py). `retro-jax info --config tiny`."""

from retro_jax.config import experiment_config


def get_config():
    return experiment_config("tiny")
