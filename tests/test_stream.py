"""Block streaming (``lowbit-compile --stream``): the same artifact as the in-memory path, and bad checkpoints
refused before calibration with nothing left behind."""

from pathlib import Path

import pytest
import torch

from lowbit.compiler.frontend.cli import compile_main
from lowbit.runtime.artifact import load

FILES = ("packed.safetensors", "float.safetensors")


def _sharded(tiny_dir, arch, tmp_path) -> Path:
    """The tiny model saved again in several safetensors shards with an index (as big checkpoints come)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / f"{arch}-sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir(arch)).save_pretrained(d, max_shard_size="60KB")
    AutoTokenizer.from_pretrained(tiny_dir(arch)).save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) > 2 and (d / "model.safetensors.index.json").is_file()
    return d


def _compile(model, text_file, out, *extra) -> int:
    return compile_main([str(model), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64", "-o", str(out),
                         "-q", *extra])


@pytest.mark.parametrize("arch,method", [
    ("llama", ["--method", "rtn", "--bits", "4", "--group-size", "32"]),  # tied head, one file
    ("mistral", ["--method", "gptq", "--bits", "3", "--group-size", "32"]),  # untied head, sharded
])
def test_streaming_gives_the_in_memory_artifact(tiny_dir, text_file, tmp_path, arch, method):
    model = tiny_dir(arch) if arch == "llama" else _sharded(tiny_dir, arch, tmp_path)
    assert _compile(model, text_file, tmp_path / "mem", *method) == 0
    assert _compile(model, text_file, tmp_path / "stream", *method, "--stream") == 0
    for f in FILES:  # packed codes and float tensors: byte for byte
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "stream" / f).read_bytes(), f
    a, b = load(tmp_path / "mem"), load(tmp_path / "stream")
    ids = torch.randint(0, 200, (1, 24))
    assert torch.equal(a(ids), b(ids))
    assert b.manifest["calibration_run"] == {"device": "cpu", "compute_dtype": "float32", "world_size": 1,
                                             "streamed": True}
    assert not [p for p in tmp_path.iterdir() if ".spill-" in p.name]  # the spill file is gone


def test_streaming_refuses_bad_checkpoints_before_calibrating(tiny_dir, text_file, tmp_path, capsys):
    d = _sharded(tiny_dir, "mistral", tmp_path)
    shards = sorted(d.glob("model-*.safetensors"))
    # a truncated shard
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) - 100])
    assert _compile(d, text_file, tmp_path / "out", "--method", "rtn", "--stream") == 2
    assert "truncated safetensors file" in capsys.readouterr().err
    # a missing shard (named by the index)
    shards[1].unlink()
    assert _compile(d, text_file, tmp_path / "out", "--method", "rtn", "--stream") == 2
    err = capsys.readouterr().err
    assert f"shard {shards[1].name} is missing" in err, err
    assert [p.name for p in tmp_path.iterdir() if p.name != d.name and not p.name.startswith(".out.lock")] == []


def test_streaming_refusals(tiny_dir, text_file, tmp_path, capsys):
    assert _compile(tiny_dir("llama"), text_file, tmp_path / "o", "--method", "rtn", "--stream", "--head", "8") == 2
    assert "--stream does not compress the head" in capsys.readouterr().err
    assert _compile(tiny_dir("llama"), text_file, tmp_path / "o", "--method", "efficientqat", "--stream") == 2
    assert "end-to-end phase" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_streaming_holds_one_block_at_a_time(tiny_dir, tmp_path, monkeypatch):
    """While block i is calibrated, the other blocks' linears are placeholders (no memory behind them)."""
    from lowbit.compiler.engine import calibrate, stream

    seen = []
    real = calibrate.Engine._calibrate_block

    def spy(self, ctx):
        loaded = [i for i, b in enumerate(self.blocks)
                  if not stream.is_placeholder(b.self_attn.q_proj.weight)]
        seen.append((ctx.index, loaded))
        return real(self, ctx)

    monkeypatch.setattr(calibrate.Engine, "_calibrate_block", spy)
    model, _, _, st = stream.load(str(tiny_dir("llama")), tmp_path)
    try:
        from lowbit.passes.methods import build_method

        calibrate.Engine(model, build_method("rtn"), None, progress=False, stream=st).run()
        spill = st.spill.path
        assert spill.stat().st_size > 0
    finally:
        st.close()
    assert seen == [(0, [0]), (1, [1])]
    assert not spill.exists()
    assert all(stream.is_placeholder(b.mlp.down_proj.weight) for b in model.model.layers)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from lowbit.compiler.engine.tiny import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def _reader_matches_transformers(path) -> int:
    """Every tensor the streaming GGUF reader gives equals the one transformers' GGUF loader puts in the model."""
    from lowbit.compiler.engine import models, stream

    model, _, _ = models.load(str(path))
    _, _, _, streamer = stream.load(str(path), path.parent / "spill", "x")
    try:
        names = [k for k in model.state_dict() if k in streamer.ckpt]
        for k in names:
            assert torch.equal(streamer.ckpt.get(k), model.state_dict()[k]), k
    finally:
        streamer.close()
    return len(names)


def test_streaming_a_gguf_gives_the_in_memory_artifact(tiny_gguf, text_file, tmp_path):
    # dequantized (Q4_1 linears, Q8_0 embedding) and q/k rows un-permuted exactly as transformers does
    assert _reader_matches_transformers(tiny_gguf) == 2 * 9 + 2  # blocks' linears and norms, embedding, final norm
    for tag, extra in (("mem", ()), ("stream", ("--stream",))):
        assert _compile(tiny_gguf, text_file, tmp_path / tag, "--method", "gptq", "--bits", "4", "--group-size",
                        "32", *extra) == 0
    for f in FILES:
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "stream" / f).read_bytes(), f
    assert load(tmp_path / "stream").manifest["calibration_run"]["streamed"] is True


@pytest.mark.slow
def test_gguf_reader_matches_transformers_on_smollm2(tmp_path):
    from lowbit.compiler.engine import models

    src = models.resolve("smollm2-135m").path
    link = tmp_path / src.name
    link.symlink_to(src)
    assert _reader_matches_transformers(link) == 272


def test_a_gguf_header_is_parsed_once_per_load(tiny_gguf, tmp_path, monkeypatch):
    # lowbit's check, transformers' config, weights and tokenizer, and the streaming reader share one parse (gguf-py
    # takes ~8 s per parse of SmolLM2's header); the cache is dropped once the load is done
    import gguf

    from lowbit.compiler.engine import models, stream

    parses = []
    real = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: (parses.append(a), real(self, *a, **k))[1])
    models.load(str(tiny_gguf))
    assert len(parses) == 1 and not models._GGUF_READERS
    _, _, _, streamer = stream.load(str(tiny_gguf), tmp_path / "spill", "x")
    streamer.close()
    assert len(parses) == 2 and not models._GGUF_READERS
