"""retro-jax: RETRO (Borgeaud et al. 2021) in JAX/Flax.

    from retro_jax import ModelConfig, Retro
    cfg = ModelConfig.from_preset("tiny")
    variables = Retro(cfg).init(rng, tokens, neighbours)
    logits = Retro(cfg).apply(variables, tokens, neighbours)

    from retro_jax import load_exported, Generator        # inference from an export folder
    cfg, params = load_exported("export/")
    Generator("export/", "db/").generate(["Once upon a time"], max_new_tokens=64, temperature=0)
"""

from retro_jax.config import ModelConfig
from retro_jax.model import init_params
from retro_jax.infer.export import export, load_exported
from retro_jax.infer.generate import Generator
from retro_jax.model.retro import Retro

__version__ = "0.1.0"
__all__ = ["Generator", "ModelConfig", "Retro", "export", "init_params", "load_exported", "__version__"]
