"""The one config: the model's schema (`ModelConfig`) and the experiment config around it.

An experiment config is a locked `ml_collections.ConfigDict` with five sections, the schema and
defaults of which are `default_config()` (the paper's §C.1 settings):

  model  the `ModelConfig` fields      train  optimisation, data order, checkpoints
  mesh   data x fsdp x tensor sizes    eval   bits-per-byte windows
  data   the database a run trained on (filled in by `train`)

Presets are data: each file under `configs/` says what its preset is (`configs/tiny.py` holds
tiny's values) through `get_config()`, big_vision style, starting from `default_config()`.
`load_config(source, overrides)` reads a preset name, a config file or a training workdir, then
applies `--config.a.b=v` overrides through ml_collections' own flag machinery (types kept,
unknown keys refused) and validates. A workdir holds the config as one JSON file,
`config.json`, written by `write_workdir_config` and read by `read_workdir_config` only.
`model_config(config)` is the one conversion to the frozen `ModelConfig` the model takes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
from typing import Any, Iterable

import ml_collections

PAPER_VOCAB = 128_000


def _configs_dir() -> pathlib.Path:
    """The presets: retro_jax/configs/ in an installed wheel (pyproject maps configs/ there), else
    configs/ beside the package (a checkout, or an editable install of one)."""
    here = pathlib.Path(__file__).resolve().parent
    packaged = here / "configs"
    return packaged if (packaged / "tiny.py").is_file() else here.parent / "configs"


CONFIGS_DIR = _configs_dir()
WORKDIR_CONFIG = "config.json"


ATTENTION_MODES = ("auto", "dense", "blocked", "pallas")  # model/attention_mode.py


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
    # CCA output projections start at zero, so a fresh RETRO computes exactly its baseline's
    # function (and a retrofit starts from the frozen baseline's); the paper does not say.
    cca_zero_init: bool = True
    # Encoder (its own, disjoint token embeddings).
    enc_d_model: int = 896
    enc_num_layers: int = 2
    enc_num_heads: int = 16
    enc_head_dim: int = 64
    enc_d_ff: int = 3584
    enc_cross_layers: tuple[int, ...] = (1,)  # 1-indexed encoder layers that attend to the chunk
    # Layers run as: layers 1..scan_start unrolled (the first CCA layer, which runs the encoder,
    # among them), then nn.scan over blocks of scan_period identical layers, then the rest
    # unrolled. A RETRO model and its baseline share these, so their trees still differ only by
    # the retrieval weights. remat_policy: none | dots (save matmul outputs) | full (save nothing).
    scan_layers: bool = False
    scan_start: int = 6
    scan_period: int = 3
    remat_policy: str = "none"
    # Attention (model/attention_mode.py): which computation serves every RelativeAttention, all
    # of them the same function: auto (the fastest measured per call) | dense (the whole score
    # matrix) | blocked (pure JAX, block by block, never an N x N tensor) | pallas (the TPU/GPU
    # kernel). attention_block: the query/key block of blocked and pallas (shrunk to a period).
    attention: str = "auto"
    attention_block: int = 128
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
        if self.remat_policy not in ("none", "dots", "full"):
            raise ValueError(f"remat_policy must be none, dots or full, got {self.remat_policy!r}")
        self._check_attention()
        if self.scan_layers:
            self._check_scan()

    def _check_attention(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"model.attention={self.attention!r} is not one of "
                             f"{', '.join(ATTENTION_MODES)}")
        blk, r = self.attention_block, self.neighbour_len
        if self.attention != "dense" and (blk < 1 or (blk < r and r % blk)):
            raise ValueError(f"model.attention_block={blk} (model.attention={self.attention}) must "
                             f"divide the neighbour length r = 2 x chunk_size = {r}, or be >= it: "
                             "a block never straddles two neighbours")

    def _check_scan(self) -> None:
        s, p, cca = self.scan_start, self.scan_period, self.cca_layers
        if not (1 <= s <= self.num_layers and p >= 1):
            raise ValueError(f"scan_start {s} must be in 1..num_layers={self.num_layers}, scan_period {p} >= 1")
        if cca and min(cca) > s:
            raise ValueError(f"the first CCA layer {min(cca)} runs the encoder and must be unrolled: "
                             f"scan_start {s} must be >= it")
        _, n, _ = self.layer_groups
        offsets = [tuple(a for a in range(1, p + 1) if s + j * p + a in cca) for j in range(n)]
        if len(set(offsets)) > 1:
            raise ValueError(f"cca_layers {cca} do not repeat every scan_period={p} layers after layer {s}, "
                             "so the blocks cannot be scanned")

    # -- derived -----------------------------------------------------------------------
    @property
    def is_retro(self) -> bool:
        return bool(self.cca_layers)

    @property
    def neighbour_len(self) -> int:
        """r = 2m: the neighbour chunk N followed by its continuation F."""
        return 2 * self.chunk_size

    @property
    def layer_groups(self) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        """(unrolled leading layers, number of scanned blocks of scan_period layers, unrolled
        trailing layers), 1-indexed; everything unrolled when scan_layers is off."""
        if not self.scan_layers:
            return tuple(range(1, self.num_layers + 1)), 0, ()
        s, p = self.scan_start, self.scan_period
        n = (self.num_layers - s) // p
        return tuple(range(1, s + 1)), n, tuple(range(s + n * p + 1, self.num_layers + 1))

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
        return self.replace(name=f"{self.name}-baseline", cca_layers=())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        return model_config(load_config(name))


# -- the experiment config ------------------------------------------------------------------

def default_config() -> ml_collections.ConfigDict:
    """The schema of every experiment config, with the paper's defaults (§C.1, Table 2's 172M)."""
    return ml_collections.ConfigDict({
        "model": ModelConfig().to_dict(),
        "train": dict(seq_len=2048, batch_size=256, steps=100_000, lr_max=2e-4, lr_init=1e-7,
                      warmup_steps=750, lr_final_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b1=0.9,
                      b2=0.95, seed=0, log_every=50, checkpoint_every=1000, keep_checkpoints=3,
                      max_bad_steps=10, retrieval=True, eval_every=0, eval_batches=8, microbatches=1,
                      # The cosine schedule's horizon; 0: train.steps when the run starts. `train`
                      # records the value it used, so a resume with a larger --steps keeps it.
                      decay_steps=0),
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},  # -1 fills with the remaining devices
        "eval": {"window": 2048, "stride": 1024, "batch_size": 8},  # the paper's 2048 / 1024
        # Filled in by `train`: the database's folder, its tokenizer's sha256 and its manifest.json's
        # sha256 (its identity: a resume refuses another database unless told to accept it).
        "data": {"db": "", "tokenizer_sha256": "", "manifest_sha256": ""},
    })


def baseline_of(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config`'s decoder without retrieval (no CCA layers, so no encoder), named `name`."""
    config.model.name, config.model.cca_layers, config.train.retrieval = name, (), False
    return config


def model_config(config: ml_collections.ConfigDict | str) -> ModelConfig:
    """The frozen ModelConfig of an experiment config (or of a preset name / config file / workdir)."""
    if isinstance(config, (str, pathlib.Path)):
        config = load_config(config)
    return ModelConfig.from_dict(dict(config.model))


def _keys(config: ml_collections.ConfigDict) -> set[str]:
    """`section.key` of every field."""
    return {f"{section}.{key}" for section in config for key in config[section]}


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every section against the schema: no unknown or missing keys, model and train values sane."""
    got, want = _keys(config), _keys(default_config())
    if got != want:
        raise ValueError(f"config does not match the schema: unknown keys {sorted(got - want)}, "
                         f"missing keys {sorted(want - got)}")
    model_config(config)  # ModelConfig's own checks
    t = config.train
    for key in ("seq_len", "batch_size", "steps", "log_every", "checkpoint_every", "microbatches"):
        if t[key] <= 0:
            raise ValueError(f"train.{key} must be positive, got {t[key]}")
    if t.decay_steps < 0:
        raise ValueError(f"train.decay_steps must be >= 0 (0: train.steps), got {t.decay_steps}")
    if t.batch_size % t.microbatches:
        raise ValueError(f"train.batch_size {t.batch_size} does not split into train.microbatches={t.microbatches}")
    return config


def _normalise(override: str) -> str:
    """`--config.a.b=v`, `config.a.b=v` and `a.b=v` all mean `--config.a.b=v`."""
    key, sep, value = override.lstrip("-").partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} is not of the form --config.key=value")
    return f"--config.{key.removeprefix('config.')}={value}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """A copy of `config` with `--config.a.b=v` overrides applied by ml_collections' config flags.

    Values keep the type of the field they replace (ints become floats where a float is
    expected, `(4,)` or `4` for a tuple); an unknown key or a value of the wrong type is a
    ValueError naming it. The result is validated before anything compiles."""
    import difflib

    from absl import flags
    from ml_collections import config_flags
    from ml_collections.config_flags import config_path

    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()
    for arg in map(_normalise, overrides):
        key = arg.split("=", 1)[0].removeprefix("--config.")
        if key not in _keys(config):
            near = difflib.get_close_matches(key, _keys(config), n=3)
            raise ValueError(f"unknown config key {key!r}; did you mean one of {near}?" if near else
                             f"unknown config key {key!r}; the sections are {sorted(config)}")
        try:  # one flag set per override, so an error names its own key
            values = flags.FlagValues()
            config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=["retro-jax", arg])
            values(["retro-jax", arg])
        except (flags.Error, ValueError, TypeError) as e:
            typ = config_path.get_type(key, config).__name__
            raise ValueError(f"config.{key} expects {typ}, got {arg.split('=', 1)[1]!r} "
                             f"({str(e).splitlines()[0]})") from None
    return validate(config)


def _load_file(path: pathlib.Path, arg: str | None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"retro_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config()")
    return module.get_config(arg) if arg is not None else module.get_config()


def _preset_file(name: str) -> pathlib.Path:
    """configs/retro_1_5b.py for `retro-1.5b`, `retro_1_5b` or `retro_1_5b.py`."""
    return CONFIGS_DIR / (re.sub(r"[-.]", "_", name.removesuffix(".py")) + ".py")


def presets() -> dict[str, ModelConfig]:
    """Every preset under configs/, by name, smallest first (each baseline before its RETRO)."""
    cfgs = [model_config(_load_file(path, None)) for path in CONFIGS_DIR.glob("*.py")]
    return {cfg.name: cfg for cfg in sorted(cfgs, key=lambda c: (c.d_model * c.num_layers, c.is_retro))}


def read_workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The experiment config a training run wrote to workdir/config.json."""
    path = pathlib.Path(workdir) / WORKDIR_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(workdir)!r} has no {WORKDIR_CONFIG}: is it a retro-jax training workdir?")
    sections = json.loads(path.read_text())  # JSON has lists where the schema has tuples
    # Fields added since the run was written take their defaults, which keep the old behaviour
    # (scan_layers off, one microbatch, ...); unknown fields are still an error.
    for name, defaults in default_config().to_dict().items():
        if isinstance(sections.get(name), dict):
            sections[name] = {**defaults, **sections[name]}
    return validate(ml_collections.ConfigDict({s: {k: tuple(v) if isinstance(v, list) else v for k, v in sec.items()}
                                               for s, sec in sections.items()}))


def write_workdir_config(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
    path = pathlib.Path(workdir) / WORKDIR_CONFIG
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2))
    tmp.replace(path)


def load_config(source: str | pathlib.Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """The experiment config of a preset name (`tiny`, `retro-172m`), a config file (`configs/x.py`,
    `configs/x.py:arg` for `get_config(arg)`) or a training workdir, with `overrides` applied."""
    source = str(source)
    head, sep, arg = source.partition(".py:")
    path_str, arg = (head + ".py", arg) if sep else (source, None)
    path = pathlib.Path(path_str)
    if path.is_dir() and (path / WORKDIR_CONFIG).is_file():
        config = read_workdir_config(path)
    elif path.suffix == ".py" and path.is_file():
        config = _load_file(path, arg)
    elif _preset_file(path_str).is_file():
        config = _load_file(_preset_file(path_str), arg)
    else:
        names = ", ".join(p.stem for p in sorted(CONFIGS_DIR.glob("*.py")))
        raise ValueError(f"{source!r} is neither a preset ({names}; '-' and '.' may stand for '_'), a "
                         f"config file nor a training workdir")
    return apply_overrides(config, overrides)


PAPER_PARAMS_M = {  # Table 2 of the paper, non-embedding parameters (millions)
    "baseline-132m": 132, "retro-172m": 172, "baseline-368m": 368, "retro-425m": 425,
    "baseline-1.3b": 1309, "retro-1.5b": 1451, "baseline-7b": 6982, "retro-7.5b": 7532,
}
