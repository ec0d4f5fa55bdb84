"""The `lorakit` command: a thin map from subcommand to a function.

    lorakit train [RECIPE] [--section.key VALUE ...] [--overwrite | --resume] [--nproc N]
    lorakit eval RUN [--split test] [--base]
    lorakit predict RUN TEXT ... | --file FILE
    lorakit generate RUN --prompt TEXT
    lorakit merge RUN --out DIR
    lorakit inspect [RECIPE] [--section.key VALUE ...]
    lorakit experiment NAME [--quick] [--out DIR]

Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """overrides: any recipe key as --section.key VALUE, e.g. --lora.r 16 --train.epochs 1
--lora.targets query,key,value --data.path reviews.csv --data.text_column review --out runs/mine.
Recipes are TOML or YAML files with the sections model, data, lora, train (see recipes/)."""


def _config(recipe: str | None, overrides: list[str]):
    from .train.config import build_config, load_recipe

    return build_config(load_recipe(recipe) if recipe else {}, overrides)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .train.config import load_recipe
    from .train.recipe import prepare_run_dir, run_config, train

    cfg = _config(args.recipe, overrides)
    if args.resume:  # the run's own settings, with only what this command names changed
        cfg = run_config(Path(cfg.out), load_recipe(args.recipe) if args.recipe else {}, overrides)
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .train.distributed import launch

        prepare_run_dir(cfg, args.resume, args.overwrite)  # refuse bad input here, before any rank starts
        argv = ["train", *([args.recipe] if args.recipe else []), *overrides,
                *(["--overwrite"] if args.overwrite else []), *(["--resume"] if args.resume else [])]
        return launch(argv, args.nproc)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_eval(args: argparse.Namespace, _: list[str]) -> int:
    from .train.recipe import load_run
    from .train.tasks import evaluate

    import warnings

    from .files import BaseMismatch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BaseMismatch)
        cfg, task = load_run(args.run, with_adapter=not args.base, quantize=args.quantize)
    notes = [str(w.message) for w in caught if issubclass(w.category, BaseMismatch)]
    for note in notes:
        print(f"lorakit: note: {note}", file=sys.stderr)
    result = evaluate(task, task.model, args.split, cfg.train.eval_batch_size)
    print(json.dumps({"run": args.run, "split": args.split, "adapter": not args.base,
                      "quantize": cfg.model.quantize, **result, **({"base_mismatch": notes} if notes else {})}))
    return 0


def cmd_predict(args: argparse.Namespace, _: list[str]) -> int:
    import torch

    from .train import data as D
    from .train.recipe import RunError, load_run

    texts = list(args.texts)
    if args.file:
        texts += [line for line in D.read_text(args.file, "--file").splitlines() if line.strip()]
    if not texts:
        raise D.DataError("no texts to label; give them as arguments or with --file")
    cfg, task = load_run(args.run)
    if cfg.task != "classify":
        raise RunError(f"predict labels texts; this run's task is {cfg.task}")
    ids = D.tokenize_texts(task.tokenizer, texts, cfg.model.max_length)
    pad = task.tokenizer.pad_token_id or 0
    with torch.no_grad():
        for i in range(0, len(ids), 64):
            input_ids, mask = D.pad_batch(ids[i:i + 64], pad)
            probs = task.model(input_ids=input_ids.to(task.device),
                               attention_mask=mask.to(task.device)).logits.float().softmax(-1).cpu()
            for text, p in zip(texts[i:i + 64], probs):
                k = int(p.argmax())
                print(f"{task.label_names[k]}\t{p[k]:.3f}\t{text}")
    return 0


def cmd_generate(args: argparse.Namespace, _: list[str]) -> int:
    import torch

    from .adapters import disable_adapters, enable_adapters
    from .train.data import DataError
    from .train.recipe import RunError, load_run

    if not args.prompt.strip():
        raise DataError("--prompt is empty; give the text to continue")
    cfg, task = load_run(args.run)
    if cfg.task != "causal-lm":
        raise RunError(f"generate needs a causal-lm run; this run's task is {cfg.task}")
    enc = task.tokenizer(args.prompt, return_tensors="pt").to(task.device)
    limit = getattr(task.model.config, "max_position_embeddings", None)
    length = enc["input_ids"].shape[1] + args.max_new_tokens
    if isinstance(limit, int) and length > limit:
        raise DataError(f"the prompt ({enc['input_ids'].shape[1]} tokens) and --max-new-tokens {args.max_new_tokens} "
                        f"make {length} positions; the model has {limit}")
    outputs = {}
    for label in ("without adapter", "with adapter"):
        (disable_adapters if label == "without adapter" else enable_adapters)(task.model)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = task.model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                      pad_token_id=task.tokenizer.pad_token_id or task.tokenizer.eos_token_id)
        outputs[label] = task.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"--- {label}:\n{args.prompt}{outputs[label]}\n")
    return 0


def cmd_merge(args: argparse.Namespace, _: list[str]) -> int:
    import torch

    from . import atomic, tensorfile
    from .merge import merge_and_unload
    from .train.recipe import RunError, load_run

    out = Path(args.out)

    def free(target: Path) -> None:
        if target.exists() and not target.is_dir():
            raise RunError(f"--out {target} is a file; give a folder for the merged model")
        if target.is_dir() and any(target.iterdir()):
            if not args.overwrite:
                raise RunError(f"{target} is not empty; pass --overwrite to replace the model there")
            if not any((target / f).is_file() for f in ("config.json", "model.safetensors")):
                raise RunError(f"{target} holds files that are not a model; --overwrite replaces a model folder, "
                               f"so give a new or empty folder")

    free(out)
    cfg, task = load_run(args.run)
    quantized = cfg.model.quantize != "none"
    model = merge_and_unload(task.model, dtype=torch.float32 if quantized else None)
    if quantized:
        print(f"lorakit: the {cfg.model.quantize} base was dequantized to fp32 and the adapter added exactly")
    def fill(tmp: Path) -> None:
        if cfg.task == "image":
            (tmp / "model.safetensors").write_bytes(tensorfile.dumps(model.state_dict()))
        else:
            model.save_pretrained(tmp)
            task.tokenizer.save_pretrained(tmp)

    atomic.write_dir(out, fill, check=free)
    print(f"lorakit: wrote the merged model to {out}")
    return 0


def cmd_inspect(args: argparse.Namespace, overrides: list[str]) -> int:
    from .layers import kind_of
    from .train.recipe import head_of, inject_from_config
    from .train.tasks import prepare

    cfg = _config(args.recipe, overrides)
    task = prepare(cfg)
    model, head = task.model, head_of(cfg, task)
    report = inject_from_config(cfg, task, dry_run=True)
    chosen = {r.name: r for r in report.replaced}
    print(f"{type(model).__name__} — ◆ LoRA target, ● trains in full (modules_to_save)")
    for name, module in model.named_modules():
        if not name:
            continue
        depth = name.count(".")
        own = sum(p.numel() for p in module.parameters(recurse=False))
        mark = "◆" if name in chosen else "●" if name in head else " "
        shape = f" {tuple(module.weight.shape)}" if kind_of(module) else ""
        extra = f"  + {chosen[name].params:,} LoRA params" if name in chosen else ""
        print(f"{mark} {'  ' * depth}{name.rsplit('.', 1)[-1]} ({type(module).__name__}){shape}"
              f"{f'  {own:,} params' if own else ''}{extra}")
    print()
    print(report)
    return 0


def cmd_experiment(args: argparse.Namespace, _: list[str]) -> int:
    from .experiments import STUDIES, study

    names = list(STUDIES) if args.name == "all" else [args.name]
    for name in names:
        run = study(name)
        out = Path(args.out) / name if args.out else Path("runs" if args.quick else "docs") / "experiments" / name
        print(f"lorakit: experiment {name}{' (quick)' if args.quick else ''} → {out}")
        print(f"lorakit: wrote {run(out, args.quick, args.seed)}")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line (exit code 2) like every other error of the command."""

    def error(self, message: str) -> None:
        print(f"lorakit: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorakit", description="LoRA fine-tuning for PyTorch models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune with LoRA (no arguments: sentiment on the packaged MiniLM)",
                       usage="lorakit train [RECIPE] [--section.key VALUE ...] [--overwrite | --resume] [--nproc N]",
                       description="RECIPE: a TOML or YAML recipe (default: the built-in sentiment job).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    mode.add_argument("--resume", action="store_true", help="continue the interrupted run in the output folder")
    p.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="train on N processes of this machine, launched by torchrun (train.distributed: ddp or fsdp)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of a run's model on a split")
    p.add_argument("run", help="run directory written by `lorakit train`")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--base", action="store_true", help="evaluate the base model without the adapter")
    p.add_argument("--quantize", choices=["none", "nf4"],
                   help="load the base in this precision instead of the run's (none: an NF4-trained adapter on "
                        "the float base, with the mismatch reported)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="label texts with a classification run")
    p.add_argument("run", help="run directory")
    p.add_argument("texts", nargs="*", help="texts to label")
    p.add_argument("--file", help="a file with one text per line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="continue a prompt with and without a causal-LM run's adapter")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="write the run's model with the adapter merged in (HF directory)")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="show the module tree and what a target spec would adapt; changes nothing",
                       usage="lorakit inspect [RECIPE] [--section.key VALUE ...]",
                       description="RECIPE: a TOML or YAML recipe (default: the built-in sentiment job).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_inspect)
    from .experiments import STUDIES

    p = sub.add_parser("experiment", help="reproduce a published LoRA result and write report.md with plots")
    p.add_argument("name", choices=[*STUDIES, "all"], help="the study")
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute) that checks the study works")
    p.add_argument("--out", help="folder for the reports (default: docs/experiments/, quick: runs/experiments/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .files import AdapterFileError
    from .hub import MissingResource
    from .tensorfile import TensorFileError
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError
    from .train.data import DataError
    from .train.recipe import Interrupted, RunError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "inspect"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("train", "inspect"):
        args.recipe = rest.pop(0) if rest and not rest[0].startswith("-") else None
    try:
        return args.func(args, rest)
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"lorakit: {e}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, RunError, AdapterFileError, CheckpointError, TensorFileError, MissingResource,
            OSError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same error; one says it
            print(f"lorakit: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
