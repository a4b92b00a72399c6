"""tinylm: train a tokenizer and a small transformer on a text file, sample from it, watch it learn.

Modules, in the order data flows through them: `config` (settings), `sources` (where text comes from:
files, datasets, the Hub, texts in memory), `tokenizer`, `tokens` and `prepare` (text to token ids, cached
on disk), `batches` (random training windows), `model` (the transformer) and `anatomy` (its parameters
counted and explained), `optim` (optimizers and the learning-rate schedule), `step` (one training step,
one evaluation), `start` and `loop` (a training run), `rundir` and `checkpoint` (a run's files),
`generate` (sampling), `cli` (the `tinylm` command). Around them: `hardware` and `measure` (device,
precision, timings of this machine), `console`, `tblog` (TensorBoard), `guard` (signals, blow-ups),
`distributed` (several processes), `download` (classic corpora), `hf` and `export` (the Hugging Face
transformers format, both ways), `lesson` and `explain` (`tinylm explain`), `confdoc` (the settings'
reference), `api` (the Python API below).

The Python API (docs/python.md), for notebooks and scripts:

    import tinylm
    run = tinylm.train(data=["a text", "another text", ...], run_dir="runs/mine", overrides={...})
    run = tinylm.load("runs/mine")
    run.sample("The", max_new_tokens=50, seed=1), run.metrics, run.model, run.tokenizer, run.config, run.dir

`train`, `load` and `Run` live in tinylm/api.py, imported on first use: `import tinylm` itself imports
nothing heavy (no torch), so `tinylm --version` and `tinylm train --help` answer at once. (No module of the
package may be named `train` or `load`: importing it would replace these functions.)
"""

__version__ = "0.1.0"

_API = ("train", "load", "Run")  # tinylm.api's public names, served by __getattr__


def __getattr__(name: str):
    if name in _API:
        from tinylm import api

        return getattr(api, name)
    raise AttributeError(f"module 'tinylm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
