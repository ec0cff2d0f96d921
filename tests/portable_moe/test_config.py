import pytest

from portable_moe import ConfigError, ModelConfig, get_preset
from portable_moe.config import PRESETS


def test_presets_are_consistent():
    for name, config in PRESETS.items():
        assert config.name == name
        config.validate()


def test_deepseek_v3_has_the_published_sizes():
    config = get_preset("deepseek-v3")
    assert (config.hidden_size, config.num_hidden_layers, config.n_routed_experts) == (7168, 61, 256)
    assert (config.num_experts_per_tok, config.n_group, config.topk_group) == (8, 8, 4)
    assert (config.moe_intermediate_size, config.first_k_dense_replace, config.routed_scaling_factor) == (2048, 3, 2.5)
    assert config.cost_estimate_only
    counts = config.parameter_count()
    # Routed experts alone: 58 MoE layers x 256 experts x 3 x 7168 x 2048 = 653B (the published 671B total
    # includes MLA attention, which this reference replaces with plain attention).
    assert 640e9 < counts["total"] < 700e9
    assert counts["active_per_token"] < counts["total"] / 10


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        get_preset("huge")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_routed_experts": 9}, "not divisible by n_group"),
        ({"topk_group": 3}, "topk_group 3 exceeds n_group 2"),
        ({"num_experts_per_tok": 5}, "exceeds the 4 experts eligible"),
        ({"scoring_func": "relu"}, "scoring_func 'relu' is not one of"),
        ({"hidden_size": 66}, "not divisible by num_attention_heads"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor must be a positive number"),
        ({"first_k_dense_replace": 7}, "first_k_dense_replace 7"),
    ],
)
def test_inconsistent_config_is_refused(change, message):
    fields = {**get_preset("tiny").to_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


def test_config_round_trips_through_a_dict():
    config = get_preset("tiny-v4")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({**config.to_dict(), "extra": 1})
    with pytest.raises(ConfigError, match="incomplete model config"):
        ModelConfig.from_dict({"name": "x"})
