"""What the benchmark runners share: results.md and replacing one section of it, parsing a comma-separated
choice, and where a run comes from (lorakit's source and the machine)."""

from __future__ import annotations

import argparse
import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import write_file
from lorakit.experiments.report import cpu, git, library_versions, revision

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.md"


def silent(*args: Any) -> None:
    """A print_fn that prints nothing."""


def pick(parser: argparse.ArgumentParser, text: str, allowed: list[str] | tuple[str, ...], what: str) -> list[str]:
    """The comma-separated names in `text`, in order; a parser error naming the first unknown one (or none)."""
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        parser.error(f"unknown {what} {unknown[0] if unknown else ''!r}; {what}s: {', '.join(allowed)}")
    return chosen


def replace_section(path: Path, title: str, body: str) -> None:
    """Put `body` (which starts with `title`) in place of the `title` section of `path`, from its title line to
    the next '## ' line, keeping every other section; append it if absent. Written atomically."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# lorakit benchmarks\n\nEach section is " \
        "written by the script it names; rerun the script rather than editing the numbers.\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == title), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + body + ("\n" + rest if rest else "")
    write_file(path, text)


# ---------------------------------------------------------------- where a run comes from


def tree() -> str:
    """lorakit's `revision(describe=True)`: $LORAKIT_GIT, else `git describe --always --dirty`; else "unknown"."""
    return revision(describe=True) or "unknown"


def source_changes() -> list[str]:
    """The paths under src/ with uncommitted changes; none where $LORAKIT_GIT names a copied source."""
    if os.environ.get("LORAKIT_GIT"):
        return []
    return [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--", ":(top)src").splitlines()
            if line.strip()]


def source_state() -> str:
    """A hash of lorakit's source as the working tree has it: the commit plus any uncommitted changes."""
    state = git("rev-parse", "HEAD") + git("diff", "HEAD", "--", ":(top)src") + \
        git("status", "--porcelain", "--", ":(top)src")
    return hashlib.sha256(state.encode()).hexdigest()[:16]


def job_environment() -> dict[str, Any]:
    """Date (local time), CPU, cores, torch threads, library versions and `git describe` (None where unknown),
    as sentiment.json and qlora.json record them."""
    return {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), **library_versions(),
            "git": revision(describe=True) or None}
