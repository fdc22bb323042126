"""retro-425m: RETRO, Table 2 of the paper (d_model 1536, d_ffw 6144, 12 heads of 128, 12 layers; CCA in
layers 6, 9, 12, ...). Training settings: the paper's §C.1 (the schema's defaults)."""

from retro_jax.config import default_cca_layers, default_config


def get_config():
    config = default_config()
    config.model.update(name="retro-425m", d_model=1536, d_ff=6144, num_heads=12, head_dim=128, num_layers=12,
                        cca_layers=default_cca_layers(12))
    return config
