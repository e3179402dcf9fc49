"""UniLoraConfig validates every field and round-trips through a dict."""

import pytest

from unilora_hf import InvalidConfigError, UniLoraConfig

BAD = [
    ("r", 0), ("r", 2.0), ("r", True), ("theta_d_length", -5), ("theta_d_length", "23040"),
    ("proj_seed", -1), ("proj_seed", 2**64), ("projection", "dense"), ("target_modules", []),
    ("target_modules", "("), ("target_modules", [""]), ("target_modules", 3),
    ("unilora_dropout", 1.1), ("unilora_dropout", -0.1), ("init_theta_d_bound", 0.0),
    ("init_theta_d_bound", float("nan")), ("modules_to_save", "classifier"), ("bias", "some"),
    ("fan_in_fan_out", "yes"), ("layers_to_transform", [-1]), ("layers_to_transform", "0"),
    ("task_type", "CAUSAL"), ("r", 10**6), ("theta_d_length", 2**31), ("target_modules", "x" * 5000),
    ("layers_pattern", "(")]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_values_name_field_and_value(field, value):
    with pytest.raises(InvalidConfigError) as err:
        UniLoraConfig(**{field: value})
    assert isinstance(err.value, ValueError)
    assert f"UniLoraConfig.{field}" in str(err.value)
    assert repr(value)[:150] in str(err.value)


def test_layers_to_transform_needs_a_list_of_targets():
    with pytest.raises(InvalidConfigError, match="layers_to_transform"):
        UniLoraConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(InvalidConfigError, match="layers_pattern"):
        UniLoraConfig(target_modules=".*q_proj", layers_pattern="layers")


def test_values_peft_accepts_are_accepted():
    """PEFT 0.21.2's UniLoraConfig takes these; so does ours (with the same meaning)."""
    from peft import UniLoraConfig as PeftConfig

    for kwargs in (dict(unilora_dropout=1.0), dict(proj_seed=2**63, projection="native"),
                   dict(proj_seed=2**100, projection="peft"), dict(target_modules="ALL-LINEAR"),
                   dict(task_type="SEQ_CLS"), dict(layers_pattern="layers"), dict(layers_to_transform=[])):
        UniLoraConfig(**kwargs)
        PeftConfig(**{k: v for k, v in kwargs.items() if k != "projection"})
    assert UniLoraConfig(target_modules=["v", "q", "v"]).target_modules == ["q", "v"]  # a set, as in PEFT
    with pytest.raises(InvalidConfigError, match=r"modules_to_save = '\('"):  # PEFT would fail with re.error later
        UniLoraConfig(modules_to_save=["("])


def test_defaults_follow_the_paper():
    cfg = UniLoraConfig()
    assert (cfg.r, cfg.theta_d_length, cfg.projection, cfg.init_theta_d_bound) == (4, 23_040, "native", 0.02)


def test_round_trip_and_unknown_fields():
    cfg = UniLoraConfig(r=8, theta_d_length=1000, proj_seed=3, projection="peft", target_modules=("q", "v"),
                        layers_to_transform=(0, 2), layers_pattern="layers", unilora_dropout=0.1,
                        modules_to_save=["score"], bias="unilora_only")
    again = UniLoraConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.target_modules == ["q", "v"]
    with pytest.raises(InvalidConfigError, match="unknown UniLoraConfig field"):
        UniLoraConfig.from_dict({**cfg.to_dict(), "alpha": 16})
