"""Model configuration and the paper's presets (RETRO Table 2), plus a CPU-sized `tiny`.

A baseline is the same decoder with no CCA layers (and therefore no encoder).
Experiment configs under `configs/` are Python files exposing `get_config()` that return
an `ml_collections.ConfigDict` whose `model` entry holds the `ModelConfig` fields.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any

import ml_collections

PAPER_VOCAB = 128_000


def default_cca_layers(num_layers: int) -> tuple[int, ...]:
    """RETRO blocks in decoder layers 6, 9, 12, ... (1-indexed), as Table 2's counts imply."""
    return tuple(range(6, num_layers + 1, 3))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every size of the model. Frozen: derive variants with `dataclasses.replace` / `.replace`."""

    name: str = "custom"
    vocab_size: int = PAPER_VOCAB
    # Decoder.
    d_model: int = 896
    num_layers: int = 12
    num_heads: int = 16
    head_dim: int = 64
    d_ff: int = 3584
    # Retrieval.
    chunk_size: int = 64  # m
    num_neighbours: int = 2  # k in training
    cca_layers: tuple[int, ...] = (6, 9, 12)  # 1-indexed decoder layers holding CCA
    # Encoder (its own, disjoint token embeddings).
    enc_d_model: int = 896
    enc_num_layers: int = 2
    enc_num_heads: int = 16
    enc_head_dim: int = 64
    enc_d_ff: int = 3584
    enc_cross_layers: tuple[int, ...] = (1,)  # 1-indexed encoder layers that attend to the chunk
    # Numerics.
    dtype: str = "float32"  # compute dtype; parameters are always float32
    norm_eps: float = 1e-6
    max_wavelength: float = 10_000.0  # sinusoidal relative-position encodings (Transformer-XL)
    init_std: float = 0.02  # token embeddings

    def __post_init__(self) -> None:
        object.__setattr__(self, "cca_layers", tuple(int(i) for i in self.cca_layers))
        object.__setattr__(self, "enc_cross_layers", tuple(int(i) for i in self.enc_cross_layers))
        bad = [i for i in self.cca_layers if not 1 <= i <= self.num_layers]
        if bad:
            raise ValueError(f"cca_layers {bad} outside 1..num_layers={self.num_layers}")
        bad = [i for i in self.enc_cross_layers if not 1 <= i <= self.enc_num_layers]
        if self.cca_layers and (bad or not self.enc_cross_layers):
            raise ValueError(
                f"enc_cross_layers {self.enc_cross_layers} must be non-empty and within "
                f"1..enc_num_layers={self.enc_num_layers}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "d_ff",
                      "chunk_size", "num_neighbours"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")

    # -- derived -----------------------------------------------------------------------
    @property
    def is_retro(self) -> bool:
        return bool(self.cca_layers)

    @property
    def neighbour_len(self) -> int:
        """r = 2m: the neighbour chunk N followed by its continuation F."""
        return 2 * self.chunk_size

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def enc_attn_width(self) -> int:
        return self.enc_num_heads * self.enc_head_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def baseline(self) -> "ModelConfig":
        """The same decoder without retrieval (no CCA, hence no encoder parameters)."""
        name = PAPER_BASELINE_OF.get(self.name, f"{self.name}-baseline")
        return self.replace(name=name, cca_layers=())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cca_layers"] = list(self.cca_layers)
        d["enc_cross_layers"] = list(self.enc_cross_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]


def _paper(name: str, d: int, d_ff: int, heads: int, head_dim: int, layers: int) -> ModelConfig:
    return ModelConfig(name=name, vocab_size=PAPER_VOCAB, d_model=d, num_layers=layers,
                       num_heads=heads, head_dim=head_dim, d_ff=d_ff,
                       cca_layers=default_cca_layers(layers))


_RETRO = [
    _paper("retro-172m", 896, 3584, 16, 64, 12),
    _paper("retro-425m", 1536, 6144, 12, 128, 12),
    _paper("retro-1.5b", 2048, 8192, 16, 128, 24),
    _paper("retro-7.5b", 4096, 16384, 32, 128, 32),
]
PAPER_BASELINE_OF = {"retro-172m": "baseline-132m", "retro-425m": "baseline-368m",
                     "retro-1.5b": "baseline-1.3b", "retro-7.5b": "baseline-7b", "tiny": "tiny-baseline"}

# A CPU-sized model: a train step on 2 cores takes well under a second. Chunk size stays the
# paper's 64 so every chunk/neighbour code path is the real one.
TINY = ModelConfig(
    name="tiny", vocab_size=8192, d_model=128, num_layers=4, num_heads=4, head_dim=32, d_ff=512,
    chunk_size=64, num_neighbours=2, cca_layers=(2, 4),
    enc_d_model=64, enc_num_layers=2, enc_num_heads=4, enc_head_dim=16, enc_d_ff=256)

PRESETS: dict[str, ModelConfig] = {}
for _cfg in [*_RETRO, TINY]:
    PRESETS[_cfg.name] = _cfg
    PRESETS[PAPER_BASELINE_OF[_cfg.name]] = _cfg.baseline()

# Table 2 of the paper, non-embedding parameters (millions), for the preset-count tests.
PAPER_PARAMS_M = {
    "baseline-132m": 132, "retro-172m": 172, "baseline-368m": 368, "retro-425m": 425,
    "baseline-1.3b": 1309, "retro-1.5b": 1451, "baseline-7b": 6982, "retro-7.5b": 7532,
}

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


# Training defaults per preset (paper §C.1 for the paper sizes; CPU-sized for tiny).
_TRAIN_PAPER = dict(seq_len=2048, batch_size=256, steps=100_000, lr_max=2e-4, lr_init=1e-7,
                    warmup_steps=750, lr_final_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
                    b1=0.9, b2=0.95, seed=0, log_every=50, checkpoint_every=1000,
                    keep_checkpoints=3, max_bad_steps=10, retrieval=True, eval_every=0,
                    eval_batches=8)
_TRAIN_TINY = dict(_TRAIN_PAPER, seq_len=256, batch_size=16, steps=300, lr_max=1e-3,
                   warmup_steps=30, log_every=10, checkpoint_every=100)


def experiment_config(preset: str) -> ml_collections.ConfigDict:
    """The experiment config of a preset.

    model: the ModelConfig fields.   train: optimisation, data and checkpoint settings.
    mesh: device-mesh shape (data x fsdp x tensor; -1 fills with the remaining devices).
    eval: bits-per-byte windows (the paper: 2048 with stride 1024).
    """
    cfg = ModelConfig.from_preset(preset)
    train = dict(_TRAIN_TINY if cfg.name.startswith("tiny") else _TRAIN_PAPER)
    if cfg.name == "retro-7.5b" or cfg.name == "baseline-7b":
        train.update(lr_max=1e-4, batch_size=1024)
    train["retrieval"] = cfg.is_retro
    window = train["seq_len"]
    return ml_collections.ConfigDict({
        "name": preset,
        "model": cfg.to_dict(),
        "train": train,
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "eval": {"window": window, "stride": window // 2, "batch_size": 8},
    })


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=v` / `config.a.b=v` / `a.b=v` overrides (ml_collections' form).

    Values are parsed as Python literals and must keep the type of the field they replace;
    unknown keys are an error that lists the known ones.
    """
    import ast

    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form --config.key=value")
        key = key.removeprefix("config.")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise ValueError(f"unknown config key {key!r}: no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"unknown config key {key!r}; known keys here: {sorted(node.keys())}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        old = node[leaf]
        if isinstance(old, bool) or isinstance(value, bool):
            if not isinstance(value, bool) or not isinstance(old, bool):
                raise ValueError(f"{key} expects {type(old).__name__}, got {raw!r}")
        elif isinstance(old, float) and isinstance(value, int):
            value = float(value)
        elif isinstance(old, (list, tuple)) and isinstance(value, (list, tuple, int)):
            value = [value] if isinstance(value, int) else list(value)
        elif old is not None and not isinstance(value, type(old)):
            raise ValueError(f"{key} expects {type(old).__name__}, got {raw!r}")
        node[leaf] = value
    ModelConfig.from_dict(dict(config.model))  # validate now, before anything compiles
    return config


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
    """A preset name, a config file (`configs/retro_172m.py`) or a config name under `configs/`."""
    if name_or_path in PRESETS:
        return experiment_config(name_or_path)
    path = pathlib.Path(name_or_path)
    candidates = [path, CONFIGS_DIR / path, CONFIGS_DIR / f"{name_or_path}.py",
                  CONFIGS_DIR / f"{name_or_path.replace('-', '_').replace('.', '_')}.py"]
    for cand in candidates:
        if cand.suffix == ".py" and cand.is_file():
            spec = importlib.util.spec_from_file_location(f"retro_jax_config_{cand.stem}", cand)
            module = importlib.util.module_from_spec(spec)
            assert spec.loader is not None
            spec.loader.exec_module(module)
            if not hasattr(module, "get_config"):
                raise ValueError(f"config file {cand} has no get_config()")
            return module.get_config()
    raise ValueError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                     f"nor a config file (looked in {CONFIGS_DIR})")


def model_config(name_or_path: str) -> ModelConfig:
    return ModelConfig.from_dict(dict(load_config(name_or_path).model))
