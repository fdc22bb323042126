"""Database-size ablation on 2 CPU cores: 2 tiny models x 3 database sizes (10x apart) x 2 seeds.

The paper's Figure 1 (middle) in miniature: validation bpb against the size of the retrieval
database, for each model size, with its baseline beside it and the alpha = 0.125 curve.
    python launch/sweep.py --sweep configs/sweeps/db_size.py        (about 45 minutes on 2 cores)
    python launch/report.py out/sweeps/db_size
The database is the quickstart's: the standard library of this Python, its first 5,000
training chunks; the smaller sizes are seeded, nested document samples of it
(retro_jax/retrieval/subset.py). Training is the quickstart's (150 steps, its learning rate and
warm-up) at half its batch, 8 x 256 tokens, so that 16 runs fit the time on 2 cores.
"""

from retro_jax.quickstart import train_overrides

STEPS = 150


def get_sweep():
    return dict(
        name="db_size",
        out="out/sweeps/db_size",
        database=dict(path="out/sweeps/db_size/database",
                      build=dict(corpus=None, max_chunks=5_000, val_fraction=0.1, seed=0)),
        db_chunks=[500, 1_600, "all"],
        subset=dict(mode="documents", seed=0),
        models=[
            "tiny",
            dict(name="tiny-64", config="tiny",  # half the width of tiny, same depth and retrieval
                 overrides=["model.d_model=64", "model.num_heads=2", "model.d_ff=256"]),
        ],
        seeds=[0, 1],
        steps=STEPS,
        overrides=[o for o in train_overrides(STEPS) if not o.startswith("train.steps=")] + ["train.batch_size=8"],
        neighbour_sweep=[],
    )
