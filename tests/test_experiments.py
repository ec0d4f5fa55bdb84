"""`lorakit experiment`: each study's quick mode writes a report with finite numbers and its plots."""

import re

import pytest

from lorakit import cli
from lorakit.experiments import STUDIES, study


def test_unknown_study_is_refused():
    with pytest.raises(ValueError, match="unknown experiment 'nope'; studies: cnn-subset"):
        study("nope")


def test_merge_latency_quick(tmp_path, capsys):
    assert cli.main(["experiment", "merge-latency", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "merge-latency" / "report.md").read_text()
    assert (tmp_path / "merge-latency" / "latency.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line for line in report.splitlines() if re.match(r"\| (1|32) \|", line)]
    assert len(rows) == 2
    numbers = [float(x) for row in rows for x in re.findall(r"\d+\.\d+", row)]
    assert numbers and all(0 < x < 1e4 for x in numbers)
    assert "quick mode" in report and "- machine:" in report and "- versions:" in report


def test_every_study_has_a_cli_choice():
    parser = cli.build_parser()
    for name in STUDIES:
        assert parser.parse_args(["experiment", name, "--quick"]).name == name
