"""The scripted demo end to end on the real MiniLM, shortened."""

import lorakit.demo


def test_demo_trains_merges_and_reloads(capsys):
    result = lorakit.demo.main(["--steps", "8", "--eval-size", "64"])
    out = capsys.readouterr().out
    assert "replaced 12 modules with LoRA adapter 'default'" in out
    assert "trainable params: 74,498 || all params: 22,788,484" in out
    assert result["trainable"] == 74_498
    assert result["merge_diff"] < 1e-4 and result["reload_diff"] < 1e-4
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0
