"""tinylm: train a tokenizer and a small transformer on a text file, sample from it, watch it learn.

Modules, in the order data flows through them: `config` (settings), `tokenizer` and `data` (text to
token ids on disk), `model` (the transformer and its parameter accounting), `optim` (optimizers and
the learning-rate schedule), `step` (one training step, one evaluation), `loop` (a training run),
`rundir` and `checkpoint` (a run's files), `generate` (sampling), `cli` (the `tinylm` command). Around
them: `hardware` (device, precision), `console`, `tblog` (TensorBoard), `guard` (signals, blow-ups),
`distributed` (several processes), `download` (classic corpora), `hf` and `export` (the Hugging Face
transformers format, both ways).
"""

__version__ = "0.1.0"
