"""The `baseline-1.3b` preset (see retro_jax/config.py). `retro-jax info --config baseline-1.3b`."""

from retro_jax.config import experiment_config


def get_config():
    return experiment_config("baseline-1.3b")
