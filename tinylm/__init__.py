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
reference).
"""

__version__ = "0.1.0"
