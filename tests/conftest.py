"""Shared fixtures: small corpora made in the test, tiny configs, and one short trained run."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinylm.config import Config  # noqa: E402

ALPHABET = "abcdefgh"


def markov_text(n: int, seed: int = 0) -> str:
    """A first-order Markov chain over 8 letters where letter i is followed by letter 2i or 2i+1 (mod 8),
    each with probability 1/2. Every letter has exactly two equally likely successors, so the best
    possible next-character loss is ln 2 nats, and no model can do better."""
    rng = random.Random(seed)
    i, out = 0, []
    for _ in range(n):
        out.append(ALPHABET[i])
        i = (2 * i + rng.randrange(2)) % 8
    return "".join(out)


def file_size_limited(limit: int, script_args: list[str]) -> list[str]:
    """Python arguments that run a script (and its arguments) unable to write any file past `limit` bytes:
    the kernel refuses the write (EFBIG, RLIMIT_FSIZE) as a full disk would (ENOSPC), even for root."""
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
            "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return ["-c", code, str(limit), *script_args]


GPT2_WITH_BIASES = {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}


def tiny_config(tmp_path: Path, paths: list, **sections) -> Config:
    """A model and schedule small enough to train in seconds on a CPU."""
    cfg = Config()
    cfg.data.paths = [str(p) for p in paths]
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size = 1, 2, 32, 32
    cfg.model.dropout = 0.0  # deterministic forward passes; tests that need dropout set it
    t = cfg.train
    t.batch_size, t.max_steps, t.max_time, t.warmup_steps = 16, 40, 0, 5
    t.eval_interval, t.eval_batches, t.log_interval, t.sample_tokens = 20, 4, 5, 20
    t.evals, t.save_interval = 0, 0.0  # evaluations and checkpoints every eval_interval steps, and only then
    t.lr, t.min_lr, t.device, t.dtype = 3e-3, 3e-4, "cpu", "float32"
    t.plan = "off"  # the settings above as they are (tests of the planner turn it on)
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def read_texts(cfg, texts=None) -> list[str]:
    """Each document of a configured corpus as one string, read as `prepare` reads it."""
    from tinylm.sources import corpus_sources, iter_documents, pieces

    return ["".join(pieces(doc)) for doc in iter_documents(corpus_sources(cfg, texts))]


@pytest.fixture(scope="session", autouse=True)
def measurement_cache(tmp_path_factory):
    """Measurements made while testing (a run's CPU peak, compile times) go to a cache of the test
    session's own, never the user's (~/.cache/tinylm); subprocesses inherit it."""
    import os

    previous = os.environ.get("TINYLM_CACHE_DIR")
    os.environ["TINYLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("measurements"))
    yield
    if previous is None:
        os.environ.pop("TINYLM_CACHE_DIR", None)
    else:
        os.environ["TINYLM_CACHE_DIR"] = previous


@pytest.fixture
def one_thread():
    """One CPU thread: tiny training runs are faster that way on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def markov_file(tmp_path: Path) -> Path:
    p = tmp_path / "markov.txt"
    p.write_text(markov_text(30_000))
    return p


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """One short BPE training run, shared by the tests that only read its outputs.

    It is GPT-2 with biases and AdamW (the foundation's recipe, not today's default), so that the GPT-2
    export and the weights-and-biases story have a run to read; the default recipe has tests of its own."""
    from tinylm import rundir
    from tinylm.console import QUIET
    from tinylm.loop import train

    tmp = tmp_path_factory.mktemp("trained")
    corpus = tmp / "corpus.txt"
    corpus.write_text(("The cat sat on the mat. The dog sat on the log.\n" * 400) + "A bird sang.\n" * 100)
    cfg = tiny_config(tmp, [corpus], data={"tokenizer": "bpe", "vocab_size": 300}, model=GPT2_WITH_BIASES,
                      train={"max_steps": 100, "eval_interval": 50, "optimizer": "adamw"})
    result = train(cfg, run_dir=tmp / "runs" / "tiny", console=QUIET)
    return {"run_dir": result.run_dir, "step": result.step, "parameters": result.parameters,
            "val_loss": result.metrics["val_loss"], "result": result, "cfg": cfg,
            "model": rundir.load(result.run_dir).model}  # the trained weights, as saved
