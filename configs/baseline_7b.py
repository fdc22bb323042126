"""The `baseline-7b` preset (see retro_jax/config.py). `retro-jax info --config baseline-7b`."""

from retro_jax.config import experiment_config


def get_config():
    return experiment_config("baseline-7b")
