"""tinylm: train a tokenizer and a small transformer on a text file, sample from it, watch it learn.

Modules, in the order data flows through them: `config` (settings), `sources` (where text comes from:
files, datasets, the Hub, texts in memory), `tokenizer`, `tokens` and `prepare` (text to token ids, cached
on disk), `batches` (random training windows), `model` (the transformer and its parameter accounting),
`train` (the loop), `checkpoint` (saving a run), `generate` (sampling), `cli` (the `tinylm` command).
Around them: `download` (classic corpora), `hf` and `export` (the Hugging Face transformers format, both
ways).
"""

__version__ = "0.1.0"
