"""Real-model checks on SmolLM2-135M (slow: run with ``pytest -m slow``)."""


import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_gptq_w4g128_small(tmp_path):
    from lowbit.compiler.frontend.pipeline import CompileOptions, compile_model
    from lowbit.runtime import load

    out = tmp_path / "smol"
    rep = compile_model(CompileOptions(
        model="smollm2-135m", method="gptq", method_options={"bits": 4, "group_size": 128},
        output=str(out), nsamples=16, seqlen=256, eval=("wikitext2",), eval_windows=2, progress=False))
    s = rep["summary"]
    assert s["compressed_linears"] == 210
    assert s["bits_per_weight_on_disk"] <= 4.3
    ev = rep["eval"]["wikitext2"]
    assert ev["after"]["ppl"] < 1.5 * ev["before"]["ppl"]
    a = load(out)
    ids = torch.randint(0, 1000, (1, 32))
    assert torch.isfinite(a(ids)).all()
