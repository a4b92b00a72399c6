"""Text -> token ids -> text, through Hugging Face `tokenizers`.

Two kinds, both saved as one `tokenizer.json` that `tokenizers.Tokenizer.from_file` reads:

* `bpe`: byte-level BPE (GPT-2's scheme). Every UTF-8 string maps to bytes first, so any text
  round-trips exactly, even characters never seen in training. Trained with `BpeTrainer`.
* `char`: one token per character seen in the training text (nanoGPT's Shakespeare setup). A character
  it never saw cannot be encoded: `encode` stops with an error naming the characters, rather than
  silently dropping or replacing them.

Both reserve `<|endoftext|>`, used between documents and as the start token of an empty prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tinylm.errors import UserError

EOT = "<|endoftext|>"


class TextTokenizer:
    """A trained HF tokenizer plus the little tinylm needs on top: its kind and the EOT id."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.kind = "char" if isinstance(tok.decoder, decoders.Fuse) else "bpe"
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise UserError(f"tokenizer has no {EOT} token; was it made by tinylm?")
        self.eot_id: int = eot
        # Characters a char tokenizer knows (specials excluded), for the unseen-character check.
        self._chars = {t for t in tok.get_vocab() if t != EOT} if self.kind == "char" else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def check_known(self, text: str) -> None:
        """Char tokenizer: raise if text holds characters outside the vocabulary."""
        if self._chars is None:
            return
        unseen = set(text) - self._chars
        if unseen:
            shown = ", ".join(repr(c) for c in sorted(unseen)[:10])
            more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
            raise UserError(
                f"the character tokenizer never saw {shown}{more} in its training text; "
                "use only characters from the corpus, or train with data.tokenizer=bpe"
            )

    def encode(self, text: str) -> list[int]:
        self.check_known(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many strings in parallel (Rust threads); the caller checks characters if it must."""
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def stream_decoder(self) -> decoders.DecodeStream:
        """An incremental decoder: `.step(tok.tok, id)` returns new text once it forms whole characters."""
        return decoders.DecodeStream(skip_special_tokens=False)

    def identity(self) -> dict[str, object]:
        """What identifies this tokenizer, saved with every checkpoint: the sha256 of its canonical JSON
        (`tokenizers`' own serialisation, the same however the file was indented) and its vocabulary size."""
        return {"sha256": hashlib.sha256(self.tok.to_str().encode()).hexdigest(), "vocab_size": self.vocab_size}

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"tokenizer file not found: {p}")
        try:
            return cls(Tokenizer.from_file(str(p)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"cannot read tokenizer {p}: {str(e).splitlines()[0]}") from None


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE with `vocab_size` entries (256 byte tokens + EOT + learned merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


def train_char(texts: Iterable[str]) -> TextTokenizer:
    """One token per distinct character, in sorted order, then EOT (ids are stable for a given text)."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    if not chars:
        raise UserError("cannot build a character vocabulary from empty text")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab[EOT] = len(vocab)
    # A BPE model with no merges is exactly a character lookup; splitting every character out first
    # keeps the work linear on long lines, and the Fuse decoder joins tokens back with nothing between.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOT])
    return TextTokenizer(tok)


def train(texts: Iterable[str], kind: str, vocab_size: int) -> TextTokenizer:
    if kind == "char":
        return train_char(texts)
    return train_bpe(texts, vocab_size)
