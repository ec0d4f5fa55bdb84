"""The report every study writes: report.md with the setting, the numbers as measured, and plots.

Numbers enter a report only from measurements made in the same run; nothing is typed in by hand.
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import atomic


def git(*args: str) -> str:
    """What `git ARGS` prints, run in the checkout that holds lorakit's source; "" where there is no git or
    no checkout. Paths given as `:(top)PATH` are from the checkout's root."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def revision(describe: bool = False) -> str:
    """Which lorakit source this is: $LORAKIT_GIT where set (the source copied to another machine, whose .git,
    if any, is not the source's), else the checkout's `git rev-parse --short HEAD`, or with `describe` its
    `git describe --always --dirty`; "" where neither is known."""
    if os.environ.get("LORAKIT_GIT"):
        return os.environ["LORAKIT_GIT"]
    args = ("describe", "--always", "--dirty") if describe else ("rev-parse", "--short", "HEAD")
    return git(*args).strip()


def cpu() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU, cores, torch threads and GPU (where torch sees one), in one line."""
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}"


def library_versions() -> dict[str, str]:
    """python, torch, transformers and peft (where installed) and lorakit: name -> version, in that order."""
    import torch

    from .. import __version__

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return {**out, "lorakit": __version__}


def versions() -> str:
    """`library_versions()` in one line, with lorakit's `revision()`."""
    commit = revision()
    return ", ".join(f"{k} {v}" for k, v in library_versions().items()) + (f" (git {commit})" if commit else "")


def utc_now() -> str:
    """The time now, UTC, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_facts() -> dict[str, str]:
    """When, where and with what a run is made, as its report states them."""
    return {"date": utc_now(), "machine": machine(), "versions": versions()}


@dataclass
class Report:
    """Markdown built up section by section; `write` puts report.md (and the plots) in `out`."""

    title: str
    out: Path
    lines: list[str] = field(default_factory=list)

    def header(self, what: str, command: str, seeds: list[int], quick: bool, run: dict[str, str] | None = None) -> None:
        """The setting, then date, machine, versions, command and seeds. `run`: those facts as recorded
        by an earlier run ({"date", "machine", "versions"}) when its saved results are rendered again."""
        run = run or run_facts()
        self.lines += [f"# {self.title}", "", what, "",
                       f"- date: {run['date']}",
                       f"- machine: {run['machine']}", f"- versions: {run['versions']}", f"- command: `{command}`",
                       f"- seeds: {', '.join(map(str, seeds))}"]
        if quick:
            self.lines.append("- **quick mode**: a reduced run to check the study works; its numbers are not the study's")
        self.lines.append("")

    def add(self, *lines: str) -> None:
        self.lines += list(lines)

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.lines.append("")

    def figure(self, fig, name: str, caption: str) -> None:
        """Save a matplotlib figure as out/name.png and link it."""
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
        atomic.write_file(self.out / f"{name}.png", png.getvalue())
        self.lines += [f"![{caption}]({name}.png)", ""]

    def write(self) -> Path:
        return atomic.write_file(self.out / "report.md", "\n".join(self.lines).rstrip() + "\n")


def command_line() -> str:
    """How this process was started, as a user would type it."""
    if sys.argv and sys.argv[0].endswith(("lorakit", "__main__.py")):
        return "lorakit " + " ".join(sys.argv[1:])
    return "python " + " ".join(sys.argv)
