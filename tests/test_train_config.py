"""Recipes and overrides become typed, validated RunConfig objects."""

import pytest

from lorakit.train.config import ConfigError, RunConfig, build_config, load_recipe


def test_defaults_are_the_sentiment_job():
    cfg = build_config()
    assert cfg == RunConfig()
    assert (cfg.task, cfg.lora.r, cfg.lora.method, cfg.train.epochs) == ("classify", 8, "lora", 2)


@pytest.mark.parametrize("name", ["sentiment.toml", "sentiment.yaml", "causal-lm.toml", "image.toml", "image-lora.toml"])
def test_shipped_recipes_load(name):
    cfg = build_config(load_recipe(f"recipes/{name}"))
    assert cfg.out.startswith("runs/")


def test_overrides_are_typed_and_win():
    cfg = build_config(load_recipe("recipes/sentiment.toml"),
                       ["--lora.r", "16", "--lora.targets", "query,key,value", "--train.bf16", "true",
                        "--train.lr=3e-4", "--data.max_train", "none", "--out", "runs/x"])
    assert cfg.lora.r == 16 and cfg.lora.targets == ["query", "key", "value"]
    assert cfg.train.bf16 is True and cfg.train.lr == 3e-4 and cfg.data.max_train is None and cfg.out == "runs/x"


@pytest.mark.parametrize("overrides, message", [
    (["--lora.r", "-2"], "lora.r must be an integer >= 1, got -2"),
    (["--lora.r", "2.5"], "lora.r must be an integer, got '2.5'"),
    (["--lora.dropout", "1.5"], "lora.dropout must be in [0, 1), got 1.5"),
    (["--lora.bias", "some"], "lora.bias must be one of none, all, lora_only; got 'some'"),
    (["--task", "translate"], "task must be one of classify, causal-lm, image; got 'translate'"),
    (["--train.bf16", "maybe"], "train.bf16 must be true or false, got 'maybe'"),
    (["--train.schedule", "step"], "train.schedule must be one of linear, cosine, constant; got 'step'"),
    (["--trian.lr", "1"], "unknown key trian; the recipe has:"),
    (["--train.device", "tpu"], "train.device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
    (["--train.lr"], "--train.lr needs a value"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_overrides_name_the_key_and_value(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config({}, overrides)
    assert message in str(e.value)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("task = [unclosed")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "none.toml")
    txt = tmp_path / "r.txt"
    txt.write_text("x")
    with pytest.raises(ConfigError, match="must end in .toml, .yaml or .yml"):
        load_recipe(txt)
