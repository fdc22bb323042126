"""retro-1.5b: RETRO, Table 2 of the paper (d_model 2048, d_ffw 8192, 16 heads of 128, 24 layers; CCA in
layers 6, 9, 12, ...). Training settings: the paper's §C.1 (the schema's defaults)."""

from retro_jax.config import default_cca_layers, default_config


def get_config():
    config = default_config()
    config.model.update(name="retro-1.5b", d_model=2048, d_ff=8192, num_heads=16, head_dim=128, num_layers=24,
                        cca_layers=default_cca_layers(24))
    return config
