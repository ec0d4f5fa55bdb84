"""The `lorakit` command: a thin map from subcommand to a typed function.

    lorakit train [RECIPE] [--section.key VALUE ...] [--overwrite | --resume] [--nproc N]
    lorakit eval RUN [--split test | --data.path FILE] [--base]
    lorakit predict RUN TEXT ... | --file FILE [--output FILE.csv|.jsonl]
    lorakit generate RUN --prompt TEXT
    lorakit merge RUN --out DIR
    lorakit inspect [RECIPE|RUN] [--section.key VALUE ...] [--shapes] [--html FILE]
    lorakit serve [RUN_OR_MODEL] [--adapter NAME=PATH ...] [--adapter-dir DIR] [--api-keys FILE] ... [--ray ...]
    lorakit experiment NAME [--quick] [--out DIR]

Every recipe key is an option (`--lora.r 16`, `--train.epochs=1`), generated from the config dataclasses.
Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from pathlib import Path

EPILOG = """Every recipe key is an option --section.key VALUE, e.g. --lora.r 16 --train.epochs 1
--lora.targets query,key,value --data.path reviews.csv --data.text_column review --out runs/mine.
Recipes are TOML or YAML files with the sections model, data, lora, train (see recipes/)."""


class UsageError(Exception):
    """Arguments that cannot be used together or at all."""


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import build_config, load_recipe
    from .train.recipe import prepare_run_dir, run_config, train

    recipe = load_recipe(args.recipe) if args.recipe else {}
    cfg = build_config(recipe, args.overrides)
    if args.resume:  # the run's own settings, with only what this command names changed
        cfg = run_config(Path(cfg.out), recipe, args.overrides)
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .train.distributed import launch

        prepare_run_dir(cfg, args.resume, args.overwrite)  # refuse bad input here, before any rank starts
        argv = ["train", *([args.recipe] if args.recipe else []), *args.overrides,
                *(["--overwrite"] if args.overwrite else []), *(["--resume"] if args.resume else [])]
        return launch(argv, args.nproc)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.runs import evaluate_run

    if args.file and args.split != "test":
        raise UsageError("give --split or --data.path, not both")
    result = evaluate_run(args.run, args.split, args.base, args.quantize, args.file, args.text_column,
                          args.label_column)
    for note in result.get("base_mismatch", []):
        print(f"lorakit: note: {note}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .train.runs import predict, run_config_data, write_predictions
    from .train.data import read_texts

    texts = list(args.texts)
    if args.file:
        column = args.text_column or run_config_data(Path(args.run)).get("data", {}).get("text_column", "text")
        texts += read_texts(args.file, column)
    if not texts:
        raise UsageError("no texts to label; give them as arguments or with --file")
    predictions = predict(args.run, texts)
    if args.output:
        print(f"lorakit: wrote {len(predictions)} predictions to {write_predictions(predictions, args.output)}")
    else:
        for p in predictions:
            print(f"{p.label}\t{p.probabilities[p.label]:.3f}\t{p.text}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .train.runs import generate

    for label, text in generate(args.run, args.prompt, args.max_new_tokens, args.seed).items():
        print(f"--- {label}:\n{args.prompt}{text}\n")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .train.runs import merge_run

    print(f"lorakit: wrote the merged model to {merge_run(args.run, args.out, args.overwrite)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .train.config import build_config, load_recipe
    from .train.recipe import inspect, inspect_run

    if args.html is not None and (Path(args.html).is_dir() or not args.html.strip()):
        raise UsageError(f"--html takes the HTML file to write, got {args.html!r}")
    if args.recipe and Path(args.recipe).is_dir():
        if args.overrides:
            raise UsageError(f"{args.recipe} is a run folder, shown as it was trained; drop {args.overrides[0]}")
        print(inspect_run(args.recipe, args.shapes, args.html))
        return 0
    print(inspect(build_config(load_recipe(args.recipe) if args.recipe else {}, args.overrides), args.shapes,
                  args.html))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, run

    adapters = []
    for item in args.adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter takes NAME=PATH, got {item!r}")
        adapters.append((name, path))
    options = ServeOptions(args.target, args.model_path, args.task, tuple(adapters), args.adapter_dir, args.host,
                           args.port, args.max_loaded, tuple(args.pin or ()), args.api_keys, args.max_batch,
                           args.max_queue, args.device, args.bf16)
    ray_only = {"--replicas": args.replicas, "--autoscale": args.autoscale, "--ray-address": args.ray_address,
                "--ray-cpus": args.ray_cpus}
    if not args.ray:
        given = [flag for flag, value in ray_only.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --ray")
        return run(options)
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UsageError("--ray needs Ray Serve: pip install 'lorakit[ray]'")
    from .serve import ray as on_ray

    if args.autoscale is not None and args.replicas is not None:
        raise UsageError("give --replicas or --autoscale, not both")
    try:
        autoscale = on_ray.parse_autoscale(args.autoscale) if args.autoscale is not None else None
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    return on_ray.run(options, args.replicas or 1, autoscale, args.ray_address, args.ray_cpus or 1.0)


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import STUDIES, study

    for name in list(STUDIES) if args.name == "all" else [args.name]:
        out = Path(args.out) / name if args.out else Path("runs" if args.quick else "docs") / "experiments" / name
        print(f"lorakit: experiment {name}{' (quick)' if args.quick else ''} → {out}")
        print(f"lorakit: wrote {study(name)(out, args.quick, args.seed)}")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line (exit code 2) like every other error of the command."""

    def error(self, message: str) -> None:
        print(f"lorakit: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class _Override(argparse.Action):
    """Collects `--section.key VALUE` into args.overrides, in order, for `build_config` to type and check."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.overrides = [*getattr(namespace, "overrides", []), option_string, value]


def config_options(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """An option for every key of the run config (`--out`, `--lora.r`, ...), or of the given sections."""
    from .train.config import RunConfig

    group = parser.add_argument_group("recipe settings (override the recipe's)")
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        keys = [f"{f.name}.{g.name}" for g in dataclasses.fields(hints[f.name])] \
            if dataclasses.is_dataclass(hints[f.name]) else [f.name]
        if sections is not None and f.name not in sections:
            continue
        for key in keys:
            group.add_argument(f"--{key}", action=_Override, metavar="VALUE", default=argparse.SUPPRESS)
    parser.set_defaults(overrides=[])


def build_parser() -> argparse.ArgumentParser:
    from .experiments import STUDIES

    parser = _Parser(prog="lorakit", description="LoRA fine-tuning for PyTorch models.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    recipe_help = "a TOML or YAML recipe (default: the built-in sentiment job)"

    p = sub.add_parser("train", help="fine-tune with LoRA (no arguments: sentiment on the packaged MiniLM)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help=recipe_help)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    mode.add_argument("--resume", action="store_true", help="continue the interrupted run in the output folder")
    p.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="train on N processes of this machine, launched by torchrun (train.distributed: ddp or fsdp)")
    config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of a run's model on a split or on a data file", allow_abbrev=False)
    p.add_argument("run", help="run directory written by `lorakit train`")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--base", action="store_true", help="evaluate the base model without the adapter")
    p.add_argument("--quantize", choices=["none", "nf4"],
                   help="load the base in this precision instead of the run's (none: an NF4-trained adapter on "
                        "the float base, with the mismatch reported)")
    group = p.add_argument_group("a file of one's own, scored whole (with the run's columns unless given)")
    group.add_argument("--data.path", dest="file", metavar="FILE", help="labelled texts (classify) or a text file")
    group.add_argument("--data.text_column", dest="text_column", metavar="NAME")
    group.add_argument("--data.label_column", dest="label_column", metavar="NAME")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="label texts with a classification run", allow_abbrev=False)
    p.add_argument("run", help="run directory")
    p.add_argument("texts", nargs="*", help="texts to label")
    p.add_argument("--file", help="a CSV/TSV/JSONL file (its text column) or a text file (one text per line)")
    p.add_argument("--text-column", help="the text column of --file (default: the run's data.text_column)")
    p.add_argument("--output", help="write the labels and probabilities to FILE.csv or FILE.jsonl")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="continue a prompt with and without a causal-LM run's adapter",
                       allow_abbrev=False)
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="write the run's model with the adapter merged in (HF directory)",
                       allow_abbrev=False)
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="show the module tree and what a target spec would adapt (or a run's "
                       "model); --html draws the adapted model as an interactive graph", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("recipe", nargs="?", metavar="RECIPE|RUN", help=f"{recipe_help}; or a run folder")
    p.add_argument("--html", metavar="FILE", help="write the model traced on two examples of its data as one "
                   "self-contained HTML page: blocks, shapes, LoRA layers, before/after")
    p.add_argument("--shapes", action="store_true", help="add each module's traced input and output shapes")
    config_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="serve a base and its adapters over HTTP (OpenAI, TGI / LoRAX APIs)",
                       allow_abbrev=False)
    p.add_argument("target", nargs="?", metavar="RUN_OR_MODEL",
                   help="a run folder (its base, its adapter named after the folder) or a model folder "
                        "(default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--model.path", dest="model_path", metavar="DIR", help="the base model folder")
    p.add_argument("--task", choices=["causal-lm", "classify"], help="what the base does (default: from its config)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="serve the adapter (or run) folder PATH as NAME; repeatable")
    p.add_argument("--adapter-dir", metavar="DIR", help="serve every adapter folder under DIR, by folder name "
                                                        "(folders added later are found when asked for)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive_int, default=8000)
    p.add_argument("--max-loaded", type=_positive_int, default=16, metavar="N", help="adapters resident at most")
    p.add_argument("--pin", action="append", metavar="NAME", help="keep this adapter resident; repeatable")
    p.add_argument("--api-keys", metavar="FILE", help="TOML: each key's adapters (or \"*\") and admin flag")
    p.add_argument("--max-batch", type=_positive_int, default=16, metavar="N", help="sequences decoded together")
    p.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                   help="requests waiting to start; beyond it, 429")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bf16", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: engine replicas routed by adapter "
                                                      "(needs lorakit[ray])")
    p.add_argument("--replicas", type=_positive_int, metavar="N", help="with --ray: engine replicas (default 1)")
    p.add_argument("--autoscale", metavar="MIN:MAX", help="with --ray: autoscale between MIN and MAX replicas")
    p.add_argument("--ray-address", metavar="ADDR", help="with --ray: join this Ray cluster (default: start one "
                                                         "on 127.0.0.1)")
    p.add_argument("--ray-cpus", type=_positive_number, metavar="N", help="with --ray: CPUs per replica (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("experiment", help="reproduce a published LoRA result and write report.md with plots",
                       allow_abbrev=False)
    p.add_argument("name", choices=[*STUDIES, "all"], help="the study")
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute) that checks the study works")
    p.add_argument("--out", help="folder for the reports (default: docs/experiments/, quick: runs/experiments/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .files import AdapterFileError
    from .hub import MissingResource
    from .serve.auth import KeysFileError
    from .tensorfile import TensorFileError
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError
    from .train.data import DataError
    from .train.runs import Interrupted, RunError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (already said in one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"lorakit: {e}", file=sys.stderr)
        return 130
    except (UsageError, ConfigError, DataError, RunError, AdapterFileError, CheckpointError, TensorFileError,
            KeysFileError, MissingResource, OSError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same error; one says it
            print(f"lorakit: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
