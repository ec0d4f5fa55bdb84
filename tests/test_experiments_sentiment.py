"""The `sentiment` and `rank-targets` studies: the pieces they rest on, and each quick mode run by the real CLI."""

import math
import re


from lorakit import cli, inject, lora_layers
from lorakit.experiments.rank_targets import BUDGET, TARGETS, compare
from lorakit.experiments.sentiment import SETTINGS

PNG = b"\x89PNG\r\n\x1a\n"


def table_rows(report: str, first_cells: list[str]) -> dict[str, list[str]]:
    """The cells of the table rows whose first cell is one of `first_cells`."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_cells:
            rows[cells[0]] = cells
    return rows


def accuracies(cell: str) -> list[float]:
    values = [float(x) for x in re.findall(r"\d\.\d{4}", cell)]
    assert values, cell
    for v in values:
        assert math.isfinite(v) and 0 <= v <= 1, cell
    return values


def test_compare_calls_a_difference_within_one_std_a_tie():
    assert compare([0.80, 0.82, 0.84], [0.81, 0.83, 0.85]) == "tie"
    assert compare([0.90, 0.91, 0.92], [0.80, 0.81, 0.82]) == "ahead"
    assert compare([0.80, 0.81, 0.82], [0.90, 0.91, 0.92]) == "behind"
    assert compare([0.85], [0.84]) == "ahead"  # one seed: no spread, the means decide
    assert compare([0.85], [0.85]) == "tie"


def test_wo_target_adapts_the_attention_output_not_the_ffn_output(minilm):
    inject(minilm, TARGETS["Wq,Wk,Wv,Wo"], r=2)
    names = [n for n, _ in lora_layers(minilm)]
    assert len(names) == 6 * 4
    assert sum(n.endswith("attention.output.dense") for n in names) == 6
    assert not any(n.endswith("output.dense") and "attention" not in n for n in names)


def test_sentiment_quick(tmp_path):
    assert cli.main(["experiment", "sentiment", "--quick", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "sentiment"
    report = (folder / "report.md").read_text()
    assert (folder / "sentiment.png").read_bytes()[:8] == PNG and "(sentiment.png)" in report
    names = [s.name for s in SETTINGS]
    rows = table_rows(report, names)
    assert list(rows) == names, report
    trainable = {}
    for name, (_, params, before_after, size, seconds) in rows.items():
        before, after = accuracies(before_after)
        trainable[name] = int(params.replace(",", ""))
        assert re.fullmatch(r"[\d.]+ (kB|MB)", size) and re.match(r"\d+ s", seconds), rows[name]
    # r·(in + out) per adapted 384×384 matrix, in 6 layers, plus the 384→2 classifier
    assert trainable[names[0]] == 6 * 4 * (384 + 384) + 770
    assert trainable[names[1]] == 2 * 6 * 8 * (384 + 384) + 770
    assert trainable[names[3]] == 770 and trainable[names[2]] > 22_000_000
    assert "scores 0.5914 on the test split" in report  # the majority class, counted from the data
    assert "quick mode" in report and "## What the numbers say" in report


def test_rank_targets_quick(tmp_path):
    assert cli.main(["experiment", "rank-targets", "--quick", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "rank-targets"
    report = (folder / "report.md").read_text()
    for png in ("rank", "budget"):
        assert (folder / f"{png}.png").read_bytes()[:8] == PNG and f"({png}.png)" in report
    grid = table_rows(report, ["Wq", "Wq,Wv"])
    assert set(grid) == {"Wq", "Wq,Wv"}, report
    for cells in grid.values():
        assert len(accuracies(" ".join(cells[1:3]))) == 2  # r=1 and r=8, one seed each
    assert grid["Wq"][3] == "4,608" and grid["Wq,Wv"][3] == "9,216"  # LoRA params per unit of r
    budget = table_rows(report, [f"{t}, r={r}" for t, r in BUDGET])
    assert len(budget) == 3, report
    for cells in budget.values():
        assert cells[1] == "36,864"  # one budget: 8 × 4,608
        assert len(accuracies(cells[2])) == 1
    assert "6 runs in" in report and "**One seed**" in report
