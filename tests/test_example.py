"""The worked example (examples/compile_and_lower.py) runs end to end on a tiny model, as a build script would;
a user pass that fails is reported by name with the passes before it, and nothing is written."""

import subprocess
import sys
from pathlib import Path

import pytest

import lowbit.api as lb

ROOT = Path(__file__).resolve().parents[1]


def test_example_script_runs(tiny_dir, text_file, tmp_path):
    out = tmp_path / "ex"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "compile_and_lower.py"), str(tiny_dir("llama")),
                        str(out), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lowbit ops in the graph: 15" in r.stdout
    assert (out / "onnx" / "model.onnx").is_file() and (out / "mlir" / "model.torch.mlirbc").is_file()
    assert lb.load(out).manifest["modules"]["lm_head"]["format"]["bits"] == 4


class Broken:
    name = "my-broken-pass"

    def run(self, gm, ctx):
        raise ValueError("boom")


class Malformed:
    name = "my-malformed-pass"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(len, (out,))  # uses a node defined after it
        return lb.PassReport(self.name)


@pytest.mark.parametrize("bad,message", [(Broken(), "boom"), (Malformed(), "")])
def test_failing_user_pass_is_named_and_nothing_is_written(tiny_dir, text_file, tmp_path, bad, message):
    out = tmp_path / "art"
    with pytest.raises(lb.LowbitError) as e:
        lb.compile(str(tiny_dir("llama")), "rtn", str(out), method_options={"bits": 4, "group_size": 32},
                   calib=str(text_file), nsamples=2, seqlen=32, progress=False, extra_passes=(bad,))
    text = str(e.value)
    assert bad.name in text and "find-linear-sites, replace-linears, verify, tie-embedding, clean-up" in text \
        and message in text
    assert not out.exists() and not list(tmp_path.glob(".art*"))
