"""The report every study writes: report.md with the setting, the numbers as measured, and plots.

Numbers enter a report only from measurements made in the same run; nothing is typed in by hand.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}"


def versions() -> str:
    import torch

    from .. import __version__

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("transformers", "peft"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except ImportError:
            pass
    commit = os.environ.get("LORAKIT_GIT", "")  # set where the source was copied without its own .git
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(parts) + f", lorakit {__version__}" + (f" (git {commit})" if commit else "")


def run_facts() -> dict[str, str]:
    """When, where and with what a run is made, as its report states them."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "versions": versions()}


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
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        tmp.replace(self.out / f"{name}.png")
        self.lines += [f"![{caption}]({name}.png)", ""]

    def write(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "report.md"
        tmp = self.out / ".report.md.tmp"
        tmp.write_text("\n".join(self.lines).rstrip() + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def command_line() -> str:
    """How this process was started, as a user would type it."""
    if sys.argv and sys.argv[0].endswith(("lorakit", "__main__.py")):
        return "lorakit " + " ".join(sys.argv[1:])
    return "python " + " ".join(sys.argv)
