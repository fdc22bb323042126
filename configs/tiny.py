"""tiny: a CPU-sized RETRO; a train step on 2 cores takes well under a second.

The chunk size stays the paper's 64, so every chunk and neighbour code path is the real one.
`retro-jax info --config tiny`, `retro-jax train --config tiny ...`.
"""

from retro_jax.config import default_config


def get_config():
    config = default_config()
    config.model.update(name="tiny", vocab_size=8192, d_model=128, num_layers=4, num_heads=4, head_dim=32,
                        d_ff=512, cca_layers=(2, 4), enc_d_model=64, enc_num_layers=2, enc_num_heads=4,
                        enc_head_dim=16, enc_d_ff=256, scan_start=2, scan_period=2)
    config.train.update(seq_len=256, batch_size=16, steps=300, lr_max=1e-3, warmup_steps=30, log_every=10,
                        checkpoint_every=100)
    config.eval.update(window=256, stride=128)
    return config
