"""Recipes and overrides become typed, validated RunConfig objects."""

import copy

import pytest

from lorakit.train.config import ConfigError, LoraSection, RunConfig, TrainSection, build_config, load_recipe


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
    (["--train.max_grad_norm", "-1"], "train.max_grad_norm must be a finite number > 0, or none for no clipping, got -1.0"),
    (["--train.max_grad_norm", "0"], "train.max_grad_norm must be a finite number > 0"),
    (["--train.lr", "inf"], "train.lr must be a finite number > 0, got inf"),
    (["--train.lr", "nan"], "train.lr must be a finite number > 0, got nan"),
    (["--train.lr", "0"], "train.lr must be a finite number > 0, got 0.0"),
    (["--train.weight_decay", "-5"], "train.weight_decay must be a finite number >= 0, got -5.0"),
    (["--train.weight_decay", "inf"], "train.weight_decay must be a finite number >= 0, got inf"),
    (["--train.warmup", "nan"], "train.warmup must be a finite number in [0, 1)"),
    (["--train.warmup", "1"], "train.warmup must be a finite number in [0, 1)"),
    (["--train.seed", "-1"], "train.seed must be an integer in [0, 2**63), got -1"),
    (["--lora.alpha", "inf"], "lora.alpha must be a finite number > 0 (or None for alpha = r), got inf"),
    (["--lora.alpha", "-8"], "lora.alpha must be a finite number > 0 (or None for alpha = r), got -8.0"),
    (["--lora.dropout", "nan"], "lora.dropout must be in [0, 1), got nan"),
    (["--lora.dropout", "-1e-9"], "lora.dropout must be in [0, 1)"),
    (["--data.max_train", "0"], "data.max_train must be an integer >= 1, got 0"),
    (["--data.text_column", ""], "data.text_column must be a non-empty string"),
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


@pytest.mark.parametrize("build, message", [
    (lambda: RunConfig(train=TrainSection(lr=float("inf"))), "train.lr must be a finite number > 0, got inf"),
    (lambda: RunConfig(train=TrainSection(max_grad_norm=-1.0)), "train.max_grad_norm must be a finite number > 0"),
    (lambda: RunConfig(train=TrainSection(bf16="yes")), "train.bf16 must be true or false, got 'yes'"),
    (lambda: RunConfig(lora=LoraSection(alpha=float("nan"))), "lora.alpha must be a finite number > 0 (or None for alpha = r), got nan"),
    (lambda: RunConfig(lora=LoraSection(targets="query")), "lora.targets must be a list of module-name suffixes"),
])
def test_typed_config_validates_when_built_directly(build, message):
    """The dataclasses check their own values: code that builds a RunConfig gets the CLI's errors."""
    with pytest.raises(ConfigError) as e:
        build()
    assert message in str(e.value)


def test_recipe_numbers_must_be_finite(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nweight_decay = -inf\n")
    with pytest.raises(ConfigError, match=r"train.weight_decay must be a finite number >= 0, got -inf"):
        build_config(load_recipe(recipe))


def _other_value(hint, default):
    """A valid value of a LoraConfig field that is not its default, chosen by the field's type."""
    import typing

    literal = next((h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is typing.Literal), None)
    if literal is not None:  # a Literal, or a union with one (init: its named choices, or a pattern)
        return next(v for v in typing.get_args(literal) if v != default)
    if hint is bool:
        return not default
    if hint is int:
        return 2
    return 0.25  # float fields (alpha, dropout)


def test_a_lora_setting_is_defined_once_and_reaches_inject_the_file_and_inspect(convnet, tmp_path, reviews,
                                                                                   tiny_bert, capsys):
    """Every LoraConfig field is a recipe key (--lora.NAME), reaches inject, is written to the adapter file and
    shown by `lorakit inspect` — with no list of the fields anywhere but LoraConfig itself."""
    import dataclasses
    import json
    import typing

    import lorakit
    from lorakit import LoraConfig, cli

    hints = typing.get_type_hints(LoraConfig)
    for f in dataclasses.fields(LoraConfig):
        value = _other_value(hints[f.name], f.default)
        cfg = build_config({}, [f"--lora.{f.name}", str(value).lower() if isinstance(value, bool) else str(value)])
        assert getattr(cfg.lora.adapter, f.name) == value, f.name
        model = copy.deepcopy(convnet)
        report = lorakit.inject(model, ["fc1"], cfg.lora.adapter)
        assert getattr(report.config, f.name) == value and f"{f.name}={value}" in str(report)
        folder = tmp_path / f.name
        lorakit.save_adapter(model, folder, print_fn=lambda *a: None)
        assert json.loads((folder / "adapter_config.json").read_text())["lora"][f.name] == value, f.name
        code = cli.main(["inspect", "--data.path", str(reviews), "--data.text_column", "review", "--data.label_column",
                         "verdict", "--model.path", str(tiny_bert), f"--lora.{f.name}", str(value)])
        assert code == 0 and f"{f.name}={value}" in capsys.readouterr().out, f.name


def test_loraplus_ratio_is_checked():
    with pytest.raises(ConfigError, match=r"train.loraplus_ratio must be a finite number > 0 .*got 0"):
        build_config({"train": {"loraplus_ratio": 0}})


def test_rank_and_alpha_patterns_from_the_command_line_and_a_recipe(tmp_path):
    cfg = build_config({}, ["--lora.rank_pattern", '{"layer\\\\.0\\\\..*query": 16, "value": 4}',
                            "--lora.alpha_pattern", '{"value": 2}', "--lora.train_a", "false"])
    assert cfg.lora.rank_pattern == {r"layer\.0\..*query": 16, "value": 4} and cfg.lora.alpha_pattern == {"value": 2.0}
    assert list(cfg.lora.rank_pattern) == [r"layer\.0\..*query", "value"]  # the order decides which key wins
    assert cfg.lora.adapter.train_a is False
    recipe = tmp_path / "r.toml"
    recipe.write_text('[lora]\nrank_pattern = { query = 16, "layer\\\\.1\\\\..*value" = 2 }\n'
                      'alpha_pattern = { query = 32 }\n')
    cfg = build_config(load_recipe(recipe))
    assert cfg.lora.rank_pattern == {"query": 16, r"layer\.1\..*value": 2} and cfg.lora.alpha_pattern == {"query": 32.0}
    assert build_config().lora.rank_pattern == {} and build_config().to_dict()["lora"]["alpha_pattern"] == {}


@pytest.mark.parametrize("overrides, message", [
    (["--lora.rank_pattern", "{query: 16}"],
     "lora.rank_pattern must be a JSON object such as '{\"query\": 16}', got '{query: 16}' (Expecting property name"),
    (["--lora.rank_pattern", "[1, 2]"], "lora.rank_pattern must be a table (a JSON object on the command line)"),
    (["--lora.rank_pattern", '{"query": 2.5}'], "lora.rank_pattern['query'] must be an integer, got 2.5"),
    (["--lora.rank_pattern", '{"query": 0}'], "lora.rank_pattern['query']: r must be an integer >= 1, got 0"),
    (["--lora.alpha_pattern", '{"query": "x"}'], "lora.alpha_pattern['query'] must be a number, got 'x'"),
    (["--lora.alpha_pattern", '{"query": -1}'], "lora.alpha_pattern['query']: alpha must be a finite number > 0"),
    (["--lora.rank_pattern", '{"(query": 4}'], "lora.rank_pattern key '(query' is not a valid regex"),
    (["--lora.train_a", "sometimes"], "lora.train_a must be true or false, got 'sometimes'"),
])
def test_bad_patterns_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config({}, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resume_counts_a_reordered_pattern_as_a_change(tmp_path):
    """The first key of a pattern that matches a layer wins, so the same keys in another order are another run."""
    import json

    from lorakit.train.recipe import resume_changes
    from lorakit.train.tasks import resolved
    from lorakit.train.runs import RunError

    first = {"layer.0.attention.self.query": 6, "query": 4}
    cfg = build_config({"out": str(tmp_path), "lora": {"rank_pattern": first}})
    (tmp_path / "config.json").write_text(json.dumps(resolved(cfg).to_dict()))
    assert resume_changes(tmp_path, cfg) == {}
    swapped = build_config({"out": str(tmp_path), "lora": {"rank_pattern": dict(reversed(first.items()))}})
    with pytest.raises(RunError, match="cannot change lora.rank_pattern"):
        resume_changes(tmp_path, swapped)
