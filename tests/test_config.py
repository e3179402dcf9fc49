"""UniLoraConfig validates every field and round-trips through a dict."""

import pytest

from unilora_hf import UniLoraConfig

BAD = [
    ("r", 0), ("r", 2.0), ("r", True), ("theta_d_length", -5), ("theta_d_length", "23040"),
    ("proj_seed", -1), ("proj_seed", 2**63), ("projection", "dense"), ("target_modules", []),
    ("target_modules", "("), ("target_modules", [""]), ("target_modules", 3),
    ("unilora_dropout", 1.0), ("unilora_dropout", -0.1), ("init_theta_d_bound", 0.0),
    ("init_theta_d_bound", float("nan")), ("modules_to_save", "classifier"), ("bias", "some"),
    ("fan_in_fan_out", "yes"), ("layers_to_transform", [-1]), ("layers_to_transform", "0"),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_values_name_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        UniLoraConfig(**{field: value})
    assert f"UniLoraConfig.{field}" in str(err.value)
    assert repr(value) in str(err.value)


def test_layers_to_transform_needs_a_list_of_targets():
    with pytest.raises(ValueError, match="layers_to_transform"):
        UniLoraConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern"):
        UniLoraConfig(layers_pattern="layers")


def test_defaults_follow_the_paper():
    cfg = UniLoraConfig()
    assert (cfg.r, cfg.theta_d_length, cfg.projection, cfg.init_theta_d_bound) == (4, 23_040, "native", 0.02)


def test_round_trip_and_unknown_fields():
    cfg = UniLoraConfig(r=8, theta_d_length=1000, proj_seed=3, projection="peft", target_modules=("q", "v"),
                        layers_to_transform=(0, 2), layers_pattern="layers", unilora_dropout=0.1,
                        modules_to_save=["score"], bias="unilora_only")
    again = UniLoraConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.target_modules == ["q", "v"]
    with pytest.raises(ValueError, match="unknown UniLoraConfig field"):
        UniLoraConfig.from_dict({**cfg.to_dict(), "alpha": 16})
