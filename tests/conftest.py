import os
import random

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on CPU through the interpreter; the flag must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (scripts/test runs one worker per core) each worker gets one thread: the tests are
# mostly tracing and Python, and two workers x two threads on two cores only contend.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

WORDS = ("the of and to in is was for on that with as by at from his her are this which an be has had it "
         "river city music model weight layer number small large first second history science water light "
         "north south king army world season game team film album song station language system").split()


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(rng.choice(WORDS))
        if i % 17 == 16:
            out.append(".\n")
    return " ".join(out)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(make_text(6000))
    return p


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: tiny model directory per architecture, built once per session."""
    from lowbit.compiler.engine.tiny import make_tiny

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = make_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get
