"""Benchmark: preparing corpora larger than memory (tinylm.prepare.prepare) against tokenizing alone.

    python benchmarks/prepare_large.py                       # 100 MB and 1 GB corpora, about 20 minutes on 2 cores
    python benchmarks/prepare_large.py --sizes 2e8 --datasets-map 5e7

For each size it generates an English-like corpus into --workdir (words drawn with the frequencies of
Shakespeare and the Python docs, in lines and paragraphs; never in the repository) and prepares it with
byte-level BPE in a fresh process, printing MB/s and the process's peak resident memory (getrusage),
which should stay flat as the corpus grows. For the ratio it then times `tokenizers`' encode_batch_fast
alone, in another fresh process, on the same text cut into the same pieces and batches (nothing read,
cleaned, split, converted or written in the timed part). --datasets-map also times the alternative,
`datasets`' map(num_proc=cores) into Arrow files then a memmap, as nanoGPT's openwebtext recipe does.
The machine's load average is printed: on a shared machine compare the ratio, not the MB/s.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vocabulary():
    """English words and punctuation with their frequencies in Shakespeare (if at hand) and the Python docs."""
    from pydoc_data.topics import topics

    import numpy as np

    text = "\n".join(topics.values())
    for shared in (ROOT.parent, ROOT.parents[1]):  # shared/ beside the repository, or beside a worktree's parent
        shakespeare = shared / "shared" / "data" / "tinyshakespeare.txt"
        if shakespeare.is_file():
            text += shakespeare.read_text()
            break
    counts = collections.Counter(re.findall(r"[A-Za-z']+|[0-9]+|[.,;:!?()\"-]", text))
    p = np.array(list(counts.values()), dtype=np.float64)
    return np.array(list(counts), dtype=object), p / p.sum()


def generate(path: Path, size: int, seed: int = 0) -> None:
    """`size` bytes of words in lines (about 12 words) and paragraphs, written a million words at a time."""
    import numpy as np

    words, p = vocabulary()
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w", encoding="ascii") as f:
        while written < size:
            picked = words[rng.choice(len(words), 1_000_000, p=p)]
            r = rng.random(1_000_000)
            gaps = np.where(r < 0.006, "\n\n", np.where(r < 0.08, "\n", " ")).astype(object)
            text = re.sub(r" ([.,;:!?])", r"\1", "".join(itertools.chain.from_iterable(zip(picked, gaps))))
            text = text[: size - written]
            f.write(text)
            written += len(text)


PREPARE = """
import json, resource, sys, time
from tinylm.config import DataConfig
from tinylm.prepare import prepare
corpus, cache, vocab, sample = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(float(sys.argv[4]))
t = time.perf_counter()
prep = prepare(DataConfig(paths=[corpus], tokenizer="bpe", vocab_size=vocab, cache_dir=cache, tokenizer_sample_bytes=sample))
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": prep.meta["train_tokens"] + prep.meta["val_tokens"],
                  "tokenizer": str(prep.dir / "tokenizer.json"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

ENCODE_ONLY = """
import json, sys, time
from tokenizers import Tokenizer
from tinylm.sources import read_text_file
from tinylm.tokens import BATCH_CHARS, PIECE_CHARS, chunks
corpus, tokenizer, limit = sys.argv[1], sys.argv[2], int(float(sys.argv[3]))
tok = Tokenizer.from_file(tokenizer)
batch, size, seconds, done = [], 0, 0.0, 0
def run():
    global seconds
    t = time.perf_counter()
    tok.encode_batch_fast(batch, add_special_tokens=False)
    seconds += time.perf_counter() - t
for text in read_text_file(corpus):
    for piece in chunks(text, PIECE_CHARS):
        batch.append(piece)
        size += len(piece)
        if size >= BATCH_CHARS:
            run(); done += size; batch, size = [], 0
    if done >= limit:
        break
run(); done += size
print(json.dumps({"seconds": seconds, "bytes": done}))
"""

DATASETS_MAP = """
import json, os, resource, sys, time
import numpy as np, datasets
from tokenizers import Tokenizer
from tinylm.sources import read_text_file
from tinylm.tokens import BATCH_CHARS, PIECE_CHARS, chunks
corpus, tokenizer, limit, work = sys.argv[1], sys.argv[2], int(float(sys.argv[3])), sys.argv[4]
datasets.disable_progress_bars()
tok = Tokenizer.from_file(tokenizer)
size = 0
def pieces():
    global size
    for text in read_text_file(corpus):
        for piece in chunks(text, PIECE_CHARS):
            yield {"text": piece}
            size += len(piece)
            if size >= limit:
                return
t = time.perf_counter()
ds = datasets.Dataset.from_generator(pieces, cache_dir=work)
ids = ds.map(lambda b: {"ids": [e.ids for e in tok.encode_batch_fast(b["text"], add_special_tokens=False)]},
             batched=True, batch_size=64, num_proc=os.cpu_count(), remove_columns=["text"])
total = sum(len(i) for batch in ids.iter(batch_size=1024) for i in batch["ids"])
out = np.memmap(os.path.join(work, "ids.bin"), dtype=np.uint16, mode="w+", shape=(total,))
at = 0
for batch in ids.iter(batch_size=1024):
    flat = np.concatenate([np.asarray(i, dtype=np.uint16) for i in batch["ids"]])
    out[at : at + len(flat)] = flat
    at += len(flat)
out.flush()
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": size, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": children}))
"""


def child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"benchmark child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e8,1e9", help="corpus sizes in bytes, comma-separated")
    parser.add_argument("--workdir", default="/tmp/tinylm-prepare-bench", help="where corpora and caches go")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--sample", type=float, default=1e8, help="data.tokenizer_sample_bytes")
    parser.add_argument("--baseline", type=float, default=2e8, help="bytes encode_batch_fast alone is timed on")
    parser.add_argument("--datasets-map", type=float, default=0, help="also time datasets' map on this many bytes")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPU cores, load average {load()} at start")
    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        corpus = work / f"corpus-{size}.txt"
        if not corpus.is_file() or corpus.stat().st_size != size:
            t = time.perf_counter()
            generate(corpus, size)
            print(f"generated {corpus} ({size / 1e6:,.0f} MB) in {time.perf_counter() - t:.0f} s")
        cache = work / f"cache-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        before = child(ENCODE_ONLY, corpus, _any_tokenizer(work, args), min(args.baseline, size))
        prepared = child(PREPARE, corpus, cache, args.vocab, args.sample)
        after = child(ENCODE_ONLY, corpus, prepared["tokenizer"], min(args.baseline, size))
        prepare_mbs = size / 1e6 / prepared["seconds"]
        alone_mbs = (before["bytes"] + after["bytes"]) / 1e6 / (before["seconds"] + after["seconds"])
        row = (f"{size / 1e6:>7,.0f} MB: prepare {prepared['seconds']:6.0f} s = {prepare_mbs:5.2f} MB/s, "
               f"peak RSS {prepared['peak_rss_mb']:5.0f} MB, {prepared['tokens']:,} tokens | encode_batch_fast alone "
               f"{alone_mbs:5.2f} MB/s (before {before['bytes'] / 1e6 / before['seconds']:.2f}, after "
               f"{after['bytes'] / 1e6 / after['seconds']:.2f}) | ratio {prepare_mbs / alone_mbs:.2f} | load {load()}")
        print(row, flush=True)
        rows.append(row)
        if args.datasets_map:
            mapped = child(DATASETS_MAP, corpus, prepared["tokenizer"], min(args.datasets_map, size), work / "datasets")
            shutil.rmtree(work / "datasets", ignore_errors=True)
            print(f"  datasets map(num_proc={os.cpu_count()}) on {mapped['bytes'] / 1e6:,.0f} MB: "
                  f"{mapped['bytes'] / 1e6 / mapped['seconds']:.2f} MB/s, peak RSS {mapped['peak_rss_mb']:.0f} MB "
                  f"(main process; its workers' {mapped['worker_peak_rss_mb']:.0f} MB), load {load()}", flush=True)
    print("\n".join(["", "summary:", *rows]))


def _any_tokenizer(work: Path, args) -> Path:
    """A tokenizer for the first baseline, before this size is prepared: one from an earlier size, or a
    quick one trained on 10 MB of the generated text (encoding speed hardly depends on which)."""
    found = sorted(work.glob("cache-*/*/tokenizer.json"))
    if found:
        return found[0]
    quick = work / "quick-tokenizer.json"
    if not quick.is_file():
        sys.path.insert(0, str(ROOT))
        from tinylm.tokenizer import train_bpe

        sample = work / "sample.txt"
        generate(sample, 10_000_000, seed=1)
        text = sample.read_text()
        train_bpe((text[i : i + 65536] for i in range(0, len(text), 65536)), args.vocab).save(quick)
    return quick


if __name__ == "__main__":
    main()
