"""The `retro-jax` verbs of the model capability, called in-process. `info` is checked against
the paper's published Table 2 (not against the function that computes it)."""

import json
import re

import pytest

from retro_jax import cli

# Table 2 of Borgeaud et al. 2021 (/work/shared/RETRO.md): non-embedding parameters in millions,
# d_model, d_ffw, heads, head size, layers; RETRO's CCA layers are every 3rd from 6 (3, 3, 7, 9).
TABLE_2 = {  # preset: (params M, d_model, d_ff, heads, head size, layers, CCA layers)
    "baseline-132m": (132, 896, 3584, 16, 64, 12, 0), "retro-172m": (172, 896, 3584, 16, 64, 12, 3),
    "baseline-368m": (368, 1536, 6144, 12, 128, 12, 0), "retro-425m": (425, 1536, 6144, 12, 128, 12, 3),
    "baseline-1.3b": (1309, 2048, 8192, 16, 128, 24, 0), "retro-1.5b": (1451, 2048, 8192, 16, 128, 24, 7),
    "baseline-7b": (6982, 4096, 16384, 32, 128, 32, 0), "retro-7.5b": (7532, 4096, 16384, 32, 128, 32, 9),
}
# The paper rounds to 1M (up to 0.3% of the 172M model); our counts of the same layers must
# land within 0.5% of each published figure.
PARAMS_RTOL = 0.005
SHAPE_LINE = re.compile(r"^(\S+): d_model (\d+), (\d+) layers, (\d+)x(\d+) heads, d_ff (\d+), vocab (\d+), "
                        r"CCA layers (.+)$")


def _info(capsys, preset: str, *flags: str) -> str:
    assert cli.main(["info", "--config", preset, *flags]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("preset", list(TABLE_2))
def test_info_gives_table_2s_shapes_and_parameter_counts(capsys, preset):
    millions, d_model, d_ff, heads, head, layers, n_cca = TABLE_2[preset]
    out = json.loads(_info(capsys, preset, "--json"))
    assert set(out) == {"params_total", "params_embedding", "params_non_embedding",
                        "params_retrieval", "flops_per_token"}
    assert out["params_non_embedding"] == pytest.approx(millions * 1e6, rel=PARAMS_RTOL)
    assert out["params_total"] == out["params_embedding"] + out["params_non_embedding"]
    assert (out["params_retrieval"] > 0) == (n_cca > 0)
    # Training costs at least 6 FLOPs per non-embedding parameter and token (forward + backward).
    assert out["flops_per_token"] > 6 * out["params_non_embedding"]

    line = _info(capsys, preset).splitlines()[0]
    name, *shape, vocab, cca = SHAPE_LINE.match(line).groups()
    assert name == preset and tuple(map(int, shape)) == (d_model, layers, heads, head, d_ff)
    assert int(vocab) == 128_000  # SentencePiece, 128k tokens
    want_cca = list(range(6, layers + 1, 3)) if n_cca else []
    assert len(want_cca) == n_cca and cca == (str(want_cca) if n_cca else "none")


@pytest.mark.parametrize("retro,baseline", [("retro-172m", "baseline-132m"), ("retro-7.5b", "baseline-7b")])
def test_a_retro_is_its_baseline_plus_its_retrieval_parameters(capsys, retro, baseline):
    """Retrofitting rests on it: RETRO's tree is the baseline's plus the encoder and CCA."""
    r, b = (json.loads(_info(capsys, p, "--json")) for p in (retro, baseline))
    assert b["params_retrieval"] == 0
    assert r["params_non_embedding"] - r["params_retrieval"] == b["params_non_embedding"]


def test_info_accepts_a_config_file_and_rejects_unknown_names(capsys):
    assert cli.main(["info", "--config", "configs/tiny_baseline.py", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_retrieval"] == 0
    assert cli.main(["info", "--config", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err
