"""The `retro-jax` verbs of the model capability, called in-process."""

import json

from retro_jax import cli
from retro_jax.config import ModelConfig
from retro_jax.model.count import param_counts


def test_info_json_matches_the_library(capsys):
    assert cli.main(["info", "--config", "retro-172m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"params_total", "params_embedding", "params_non_embedding",
                        "params_retrieval", "flops_per_token"}
    counts = param_counts(ModelConfig.from_preset("retro-172m"))
    assert out["params_non_embedding"] == counts.non_embedding
    assert out["params_total"] == out["params_embedding"] + out["params_non_embedding"]
    assert out["flops_per_token"] > 6 * out["params_non_embedding"]


def test_info_accepts_a_config_file_and_rejects_unknown_names(capsys):
    assert cli.main(["info", "--config", "configs/tiny_baseline.py", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_retrieval"] == 0
    assert cli.main(["info", "--config", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err
