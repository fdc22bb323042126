"""retro-172m: RETRO, Table 2 of the paper (d_model 896, d_ffw 3584, 16 heads of 64, 12 layers; CCA in
layers 6, 9, 12, ...). Training settings: the paper's §C.1 (the schema's defaults)."""

from retro_jax.config import default_cca_layers, default_config


def get_config():
    config = default_config()
    config.model.update(name="retro-172m", d_model=896, d_ff=3584, num_heads=16, head_dim=64, num_layers=12,
                        cca_layers=default_cca_layers(12))
    return config
