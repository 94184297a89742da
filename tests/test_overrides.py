"""Per-module overrides: keep lm_head and the first block at 4 bits, the rest at 2, skip a projection."""

import json

import pytest

from lowbit.compiler.frontend.cli import compile_main

RULES = """
[[rule]]
match = "lm_head"
bits = 4

[[rule]]
match = "layers.0.*"
bits = 4

[[rule]]
match = "*.self_attn.o_proj"
skip = true
"""


def _argv(tiny_dir, text_file, out, rules, *extra):
    return [str(tiny_dir("llama")), "--method", "gptq", "--bits", "2", "--group-size", "32", "--calib", str(text_file),
            "--nsamples", "4", "--seqlen", "32", "-q", "-o", str(out), "--overrides", str(rules), *extra]


def test_overrides_file_sets_bits_per_module(tiny_dir, text_file, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    out = tmp_path / "art"
    assert compile_main(_argv(tiny_dir, text_file, out, rules)) == 0
    mods = json.loads((out / "manifest.json").read_text())["modules"]
    bits = {name: m["format"]["bits"] for name, m in mods.items()}
    assert bits["lm_head"] == 4
    assert all(b == 4 for n, b in bits.items() if n.startswith("model.layers.0."))
    assert all(b == 2 for n, b in bits.items() if n.startswith("model.layers.1."))
    assert "model.layers.1.self_attn.o_proj" not in bits  # first match wins: layers.0's o_proj is 4-bit
    assert len(bits) == 14
    report = json.loads((out / "report.json").read_text())
    assert len(report["method"]["overrides"]) == 3
    assert report["layers"]["lm_head"]["override"].startswith("rule 1")


@pytest.mark.parametrize("text,message", [
    ('[[rule]]\nbits = 4\n', "needs a non-empty string 'match'"),
    ('[[rule]]\nmatch = "layers.*"\nskip = true\nbits = 4\n', "skip = true and options"),
    ('[[rule]]\nmatch = "transformer.h.*"\nbits = 4\n', "matches no linear"),
    ('[[rule]]\nmatch = "layers.0.*"\nbits = 11\n', "--bits must be"),
    ('[[rule]\nmatch=', "cannot parse"),
])
def test_bad_overrides_fail_before_writing(tiny_dir, text_file, tmp_path, capsys, text, message):
    rules = tmp_path / "rules.toml"
    rules.write_text(text)
    out = tmp_path / "art"
    assert compile_main(_argv(tiny_dir, text_file, out, rules)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
