"""Nothing an artifact holds runs at load: crafted ``program.pt2`` archives (pickled members, guard code, shape
expressions that would be evaluated, foreign operators, opaque objects), with the manifest's hashes updated as
whoever ships an artifact would, are refused with a clear message and their payload never runs; training
checkpoints that are not lowbit's are refused cleanly."""

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lowbit.compiler.frontend.cli import compile_main, run_main
from lowbit.runtime.artifact import ArtifactError, load
from lowbit.runtime.checkpoint_io import CheckpointError, load_checkpoint


class _Payload:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def artifact(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "art"
    assert compile_main([str(tiny_dir("llama")), "--method", "rtn", "--bits", "4", "--group-size", "32", "--calib",
                         str(text_file), "--nsamples", "2", "--seqlen", "32", "-q", "-o", str(out)]) == 0
    return out


def _tamper(src: Path, dst: Path, edit) -> Path:
    """Copy the artifact, rewrite program.pt2's members with ``edit(members: dict[str, bytes])``, and update the
    manifest's size and sha256 of the file (what an attacker shipping an artifact would do)."""
    shutil.copytree(src, dst)
    pt2 = dst / "program.pt2"
    with zipfile.ZipFile(pt2) as z:
        members = {n: z.read(n) for n in z.namelist()}
    edit(members)
    pt2.unlink()
    with zipfile.ZipFile(pt2, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    man = json.loads((dst / "manifest.json").read_text())
    man["files"]["program.pt2"] = {"bytes": pt2.stat().st_size, "sha256": hashlib.sha256(pt2.read_bytes()).hexdigest()}
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def _model_json(members):
    name = next(n for n in members if n.endswith("models/model.json"))
    return name, json.loads(members[name])


def _pickled_weight(marker):
    def edit(members):
        cfg_name = next(n for n in members if n.endswith("model_weights_config.json"))
        cfg = json.loads(members[cfg_name])
        key, entry = next(iter(cfg["config"].items()))
        entry["use_pickle"] = True
        members[cfg_name] = json.dumps(cfg).encode()
        members[cfg_name.rsplit("/", 1)[0] + "/" + entry["path_name"]] = pickle.dumps(_Payload(marker))
    return edit


def _guard_code(marker):
    def edit(members):
        name, doc = _model_json(members)
        doc["guards_code"] = [f"open({str(marker)!r}, 'w').close()"]
        members[name] = json.dumps(doc).encode()
    return edit


def _shape_expression(marker):
    def edit(members):
        name, doc = _model_json(members)
        vals = doc["graph_module"]["graph"]["tensor_values"]
        for v in vals.values():
            for s in v["sizes"]:
                if "as_expr" in s:
                    s["as_expr"]["expr_str"] = f"__import__('pathlib').Path({str(marker)!r}).touch() or Symbol('s0')"
                    members[name] = json.dumps(doc).encode()
                    return
        raise AssertionError("no symbolic size in the program")
    return edit


def _foreign_operator(marker):
    def edit(members):
        name, doc = _model_json(members)
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.os.system"
        members[name] = json.dumps(doc).encode()
    return edit


def _opaque_object(marker):
    def edit(members):
        name, doc = _model_json(members)
        doc["graph_module"]["signature"]["input_specs"].append(
            {"custom_obj": {"arg": {"name": "obj0", "class_fqn": "builtins.object"}, "custom_obj_name": "obj0"}})
        members[name] = json.dumps(doc).encode()
        members[name.split("/")[0] + "/data/constants/custom_obj_0"] = pickle.dumps(_Payload(marker))
    return edit


PAYLOADS = {"pickled weight": (_pickled_weight, "pickled"), "guard code": (_guard_code, "guard code"),
            "shape expression": (_shape_expression, "shape expression"),
            "foreign operator": (_foreign_operator, "torch.os.system"), "opaque object": (_opaque_object, "opaque")}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_payload_artifacts_are_refused_and_run_nothing(artifact, tmp_path, kind, capsys):
    make, words = PAYLOADS[kind]
    marker = tmp_path / "ran"
    bad = _tamper(artifact, tmp_path / "bad", make(marker))
    with pytest.raises(ArtifactError, match=words) as e:
        load(bad)
    assert "program.pt2" in str(e.value)
    assert run_main([str(bad), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "program.pt2" in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickled weight", "guard code", "shape expression"])
def test_the_payloads_do_run_under_torch_export_load(artifact, tmp_path, kind):
    # what the check guards against: torch's own loader (or the program it returns) runs these payloads
    marker = tmp_path / "ran"
    bad = _tamper(artifact, tmp_path / "bad", PAYLOADS[kind][0](marker))
    try:
        torch.export.load(str(bad / "program.pt2")).module()(torch.randint(0, 200, (1, 5)))
    except Exception:
        pass
    assert marker.exists()


def test_a_clean_artifact_loads_with_unchanged_logits(artifact):
    art = load(artifact)
    ref = torch.export.load(str(artifact / "program.pt2"))  # torch's loader, on lowbit's own (trusted) file
    sd = ref.state_dict
    for k in list(sd):
        sd[k] = torch.nn.Parameter(art.program.state_dict[k], requires_grad=False)
    for k in list(ref.constants):
        ref.constants[k] = art.program.constants[k]
    ids = torch.randint(0, 200, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(art(ids), ref.module()(ids), rtol=0, atol=0)


def test_checkpoints_that_are_not_lowbits_are_refused_cleanly(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "finetune.pt"
    bad.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="refused to load it"):
        load_checkpoint(bad)
    assert not marker.exists()
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"step": 3, "params": {"a": torch.ones(2)}}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 3


# -- outputs: --overwrite replaces only lowbit's own outputs; interruptions leave the previous state --------------

def _compile(tiny, text, out, *extra):
    return compile_main([str(tiny), "--method", "rtn", "--bits", "4", "--group-size", "32", "--calib", str(text),
                         "--nsamples", "2", "--seqlen", "32", "-q", "-o", str(out), *extra])


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _no_partials(parent: Path):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_overwrite_refuses_what_lowbit_did_not_make(tiny_dir, text_file, tmp_path, capsys):
    tiny = tiny_dir("llama")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    before = _snapshot(tiny)
    capsys.readouterr()
    for target in (foreign, tiny, tiny.parent):  # a foreign folder, the input model, a folder above it
        assert _compile(tiny, text_file, target, "--overwrite") == 2
        err = capsys.readouterr().err
        assert str(target) in err and "Traceback" not in err and err.startswith("lowbit-compile: error:")
        assert len(err.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "keep me" and _snapshot(tiny) == before
    # lowbit's own artifact is replaced, and files are written as open() would (0644 under umask 022)
    out = tmp_path / "art"
    assert _compile(tiny, text_file, out) == 0
    old_manifest = (out / "manifest.json").read_bytes()
    assert _compile(tiny, text_file, out, "--overwrite", "--seed", "7") == 0
    assert (out / "manifest.json").read_bytes() != old_manifest and not _no_partials(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for f in ("packed.safetensors", "float.safetensors", "manifest.json"):
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_stale_partials_of_dead_processes_are_removed(tiny_dir, text_file, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".other.partial-{dead.pid}"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    alive = tmp_path / f".busy.partial-{os.getpid()}"  # this process: alive, kept
    alive.mkdir()
    assert _compile(tiny_dir("llama"), text_file, tmp_path / "art") == 0
    assert not stale.exists() and alive.exists()


@pytest.mark.parametrize("stage", ["load", "calibrate", "save", "swap"])
def test_sigterm_leaves_the_previous_artifact(artifact, tiny_dir, text_file, tmp_path, monkeypatch, stage, capsys):
    from lowbit.compiler.engine import models
    from lowbit.runtime import artifact as art
    from lowbit.runtime import output_dir

    tiny = tiny_dir("llama")
    out = tmp_path / "art"
    shutil.copytree(artifact, out)  # the previous artifact (lowbit's: it carries the marker)
    before = _snapshot(out)

    def sigterm_then(fn):
        def wrapped(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return fn(*a, **k)
        return wrapped

    if stage == "load":
        monkeypatch.setattr(models, "load", sigterm_then(models.load))
    elif stage == "calibrate":
        from lowbit.compiler.engine.calibrate import Engine

        monkeypatch.setattr(Engine, "run", sigterm_then(Engine.run))
    elif stage == "save":
        monkeypatch.setattr(art, "write", sigterm_then(art.write))
    else:  # the signal arrives while the old artifact is being swapped for the new one
        monkeypatch.setattr(output_dir, "_exchange", sigterm_then(output_dir._exchange))
    assert _compile(tiny, text_file, out, "--overwrite", "--seed", "5") == 130
    assert "interrupted" in capsys.readouterr().err
    assert not _no_partials(tmp_path)
    if stage == "swap":  # held back until the swap was done: the new artifact, complete
        assert load(out) is not None and _snapshot(out) != before
    else:
        assert _snapshot(out) == before


def test_bad_text_inputs_and_unwritable_outputs_fail_before_loading(tiny_dir, text_file, tmp_path, capsys):
    tiny = tiny_dir("llama")
    capsys.readouterr()
    utf16 = tmp_path / "calib.txt"
    utf16.write_text("some calibration text " * 50, encoding="utf-16")
    rules = tmp_path / "rules.toml"
    rules.write_bytes(b"\xff\xfe\x00\x81 binary")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(["--calib", str(utf16)], str(utf16)),
             (["--calib", str(text_file), "--eval", str(utf16)], str(utf16)),
             (["--calib", str(text_file), "--overrides", str(rules)], str(rules))]
    for extra, name in cases:
        argv = [str(tiny), "--method", "rtn", "--nsamples", "2", "--seqlen", "32", "-q", "-o", str(tmp_path / "o"),
                *extra]
        assert compile_main(argv) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err and "UTF-8" in err
    assert _compile(tiny, text_file, blocker / "out") == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and str(blocker) in err
    assert not (tmp_path / "o").exists()


# -- the loader under damage: only ArtifactError, naming the file ---------------------------------------------------

def _rehash(d: Path):
    man = json.loads((d / "manifest.json").read_text())
    for rel in man["files"]:
        p = d / rel
        if p.is_file():
            man["files"][rel] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(man))


def _json_edits(rng, man: dict):
    """A random structural edit of the manifest: a key dropped, or a value replaced by one of the wrong type."""
    paths = []

    def walk(o, path, depth):
        if depth > 3:
            return
        if isinstance(o, dict):
            for k, v in list(o.items())[:40]:
                paths.append(path + [k])
                walk(v, path + [k], depth + 1)

    walk(man, [], 0)
    path = rng.choice(paths)
    holder = man
    for k in path[:-1]:
        holder = holder[k]
    if rng.random() < 0.4:
        del holder[path[-1]]
    else:
        holder[path[-1]] = rng.choice([None, [], [1, 2], "x", -3, 10**12, {"a": 1}, 1.5, True])
    return "/".join(map(str, path))


def test_damaged_artifacts_fail_with_artifact_errors_only(artifact, tmp_path):
    import random

    rng = random.Random(0)
    names = ["manifest.json", "packed.safetensors", "float.safetensors", "program.pt2"]
    cases = 0
    for i in range(36):
        d = tmp_path / f"c{i}"
        shutil.copytree(artifact, d)
        mode = ["truncate", "flip", "json"][i % 3]
        rehash = i % 2 == 0
        name = names[(i // 3) % len(names)]
        if mode == "json":
            man = json.loads((d / "manifest.json").read_text())
            what = _json_edits(rng, man)
            (d / "manifest.json").write_text(json.dumps(man))
        else:
            p = d / name
            data = bytearray(p.read_bytes())
            if mode == "truncate":
                data = data[: rng.randrange(len(data))]
            else:
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            p.write_bytes(bytes(data))
            what = f"{mode} {name}"
            if rehash and name != "manifest.json":
                _rehash(d)
        try:
            load(d)
        except ArtifactError as e:
            msg = str(e)
            assert any(n in msg for n in names) or str(d) in msg, (what, msg)
            assert len(msg) < 2000 and "\n" not in msg.strip(), (what, msg)
            cases += 1
        # anything else (TypeError, KeyError, SafetensorError, zipfile errors, ...) fails the test;
        # a flip in float data that still loads is fine
    assert cases >= 24


def test_full_disk_fails_cleanly(tiny_dir, text_file, tmp_path):
    # a file-size limit (as a full disk does) hits the first large write; Python ignores SIGXFSZ, so the write
    # raises EFBIG; nothing half-written may remain
    import resource

    out = tmp_path / "o" / "art"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    code = "import sys; from lowbit.compiler.frontend.cli import compile_main; sys.exit(compile_main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, str(tiny_dir("llama")), "--method", "rtn", "--bits", "4",
                        "--group-size", "32", "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32", "-q",
                        "-o", str(out)], preexec_fn=limit, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("lowbit-compile: error:") and str(out) in last and "Traceback" not in p.stderr
    assert not out.exists() and not _no_partials(out.parent)


def test_a_second_writer_and_a_damaged_gguf_fail_at_once(tiny_dir, text_file, tmp_path, capsys):
    import fcntl

    tiny = tiny_dir("llama")
    capsys.readouterr()
    out = tmp_path / "art"
    with open(tmp_path / ".art.lock", "w") as held:  # another process writing the same output
        fcntl.flock(held, fcntl.LOCK_EX)
        assert _compile(tiny, text_file, out) == 2
    err = capsys.readouterr().err
    assert "another lowbit process is writing" in err and str(out) in err and not out.exists()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(range(256)) * 8)
    assert _compile(junk, text_file, tmp_path / "g") == 2
    err = capsys.readouterr().err
    assert "not a readable GGUF file" in err and str(junk) in err and "Traceback" not in err
