import math
import re

import pytest

from lorakit.experiments.cnn_subset import run, worst_classes
from lorakit.train.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR


def test_worst_classes_picks_the_k_lowest():
    assert worst_classes([0.5, 0.1, 0.9, 0.3, 0.2], 3) == [1, 4, 3]
    assert worst_classes([0.2, 0.1, 0.2, 0.2], 2) == [1, 0]  # a tie goes to the lower index
    assert worst_classes([0.7, 0.4], 2) == [1, 0]
    for k in (0, 3, True):
        with pytest.raises(ValueError, match="k must be"):
            worst_classes([0.7, 0.4], k)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
    return run(tmp_path_factory.mktemp("cnn-subset"), quick=True, seed=0)


def test_quick_run_writes_report_and_chart(quick_report):
    assert quick_report.name == "report.md" and quick_report.is_file()
    png = quick_report.parent / "per_class.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(per_class.png)" in quick_report.read_text()


def test_quick_report_table_and_chosen_classes(quick_report):
    text = quick_report.read_text()
    table = text.split("## Per-class test accuracy", 1)[1].split("\n\n")[1].splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    classes = [r for r in rows if r[0] != "overall"]
    assert [r[0].strip("*") for r in classes] == list(FASHION_MNIST_CLASSES)
    assert [r[0] for r in rows].count("overall") == 1
    base, after = {}, {}
    for name, b, a, change in rows:
        values = [float(b.rstrip("%")), float(a.rstrip("%")), float(change)]
        assert all(math.isfinite(v) for v in values), (name, values)
        assert 0 <= values[0] <= 100 and 0 <= values[1] <= 100
        assert values[2] == pytest.approx(values[1] - values[0], abs=0.11)
        base[name.strip("*")], after[name.strip("*")] = values[0], values[1]

    line = next(ln for ln in text.splitlines() if ln.startswith("Chosen by base test accuracy"))
    chosen = re.findall(r"\*\*(.+?)\*\*", line)
    assert len(chosen) == 3 and set(chosen) <= set(FASHION_MNIST_CLASSES)
    assert {r[0].strip("*") for r in classes if r[0].startswith("**")} == set(chosen)
    rest = [base[c] for c in FASHION_MNIST_CLASSES if c not in chosen]
    assert max(base[c] for c in chosen) <= min(rest)  # the three lowest base accuracies
    assert "Every B matrix moved away from zero." in text
    assert "| 2,080 |" in text and "| 816 |" in text and "| 376 |" in text and "3,272" in text
