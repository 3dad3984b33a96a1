"""task/config.py: the run config's defaults, validation and documentation."""

from __future__ import annotations

import pytest

from fedmeld.task.config import ConfigError, RunConfig, defaults


def test_config_defaults_cover_every_key_and_round_trip():
    cfg = RunConfig.from_mapping()
    assert cfg.to_flower() == defaults()
    assert RunConfig.from_mapping(cfg.to_flower()) == cfg
    for key in ("dataset", "image-size", "model", "pretrained", "num-clients", "partition", "dirichlet-alpha",
                "num-server-rounds", "local-epochs", "batch-size", "lr", "peft", "lora-rank", "lora-alpha",
                "lora-dropout", "server-lr", "seed", "out"):
        assert key in defaults()


def test_pyproject_repeats_the_defaults_flwr_run_reads(repo):
    """``flwr run .`` reads the defaults from pyproject.toml; RunConfig holds them for an installed
    fedmeld. They must be the same table."""
    import tomllib

    with (repo / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["tool"]["flwr"]["app"]["config"] == defaults()


@pytest.mark.parametrize("overrides, match", [
    ({"nmu-clients": 3}, r"unknown run-config key 'nmu-clients'; valid keys: dataset, "),
    ({"peft": "lore"}, r"bad value 'lore' for 'peft': must be '\+'-joined parts of bitfit, dora, lora, norm, vera"),
    ({"partition": "zipf"}, r"valid values: iid, dirichlet"),
    ({"num-clients": 0}, r"'num-clients': must be > 0"),
    ({"lr": "fast"}, r"'lr': expected float"),
    ({"dataset": "organmnist3d"}, r"valid values: pathmnist"),
])
def test_bad_config_is_refused_with_valid_choices(overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(overrides)


def test_peft_combinations_are_checked():
    with pytest.raises(Exception, match=r"at most one of dora/lora/vera"):
        RunConfig.from_mapping({"peft": "lora+dora"})


def test_client_ranks_are_cycled_with_one_scale_and_checked():
    cfg = RunConfig.from_mapping({"peft": "lora+norm", "client-ranks": "4,8,16", "lora-alpha": 16.0})
    assert [cfg.for_client(p).lora_rank for p in range(4)] == [4, 8, 16, 4]
    assert cfg.for_client(None).lora_rank == 16
    assert {c.lora_alpha / c.lora_rank for c in map(cfg.for_client, (0, 1, 2, None))} == {1.0}
    for bad in ({"client-ranks": "4,x"}, {"client-ranks": "4,0"}, {"client-ranks": "4,8", "aggregation": "median"},
                {"client-ranks": "4,8", "peft": "vera"}, {"aggregation": "exact", "peft": "norm"},
                {"aggregation": "exact", "proximal-mu": 0.1}, {"aggregation": "exact", "server-optimizer": "adam"}):
        with pytest.raises(ConfigError):
            RunConfig.from_mapping({"peft": "lora", **bad})


def test_readme_documents_every_run_config_key(repo):
    readme = (repo / "README.md").read_text()
    assert [k for k in defaults() if f"`{k}`" not in readme] == []
