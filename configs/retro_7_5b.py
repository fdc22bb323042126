"""retro-7.5b: RETRO, Table 2 of the paper (d_model 4096, d_ffw 16384, 32 heads of 128, 32 layers; CCA in
layers 6, 9, 12, ...). Training settings: the paper's §C.1 (the schema's defaults), but max LR 1e-4 and batch 1024 for
this size."""

from retro_jax.config import default_cca_layers, default_config


def get_config():
    config = default_config()
    config.model.update(name="retro-7.5b", d_model=4096, d_ff=16384, num_heads=32, head_dim=128, num_layers=32,
                        cca_layers=default_cca_layers(32))
    config.train.update(lr_max=1e-4, batch_size=1024)
    return config
