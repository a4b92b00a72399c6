"""Typed configuration: three sections (`model`, `data`, `train`), YAML files, command-line overrides.

A config file in `configs/` is YAML with those three sections; any field can be overridden on the
command line as `--section.field=value`. The dataclass defaults below *are* the default recipe
(`configs/default.yaml` spells out the same values, and a test keeps the two equal).

Every check lives here, so a bad value fails before any data is read or tensor allocated, with one
line that names the field. This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinylm.errors import UserError


@dataclass
class ModelConfig:
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 256  # width of every token vector (the "embedding size")
    block_size: int = 128  # context length: how many tokens the model sees at once
    bias: bool = False  # biases in Linear and LayerNorm layers (the "b" in y = w*x + b); off: faster, as good
    dropout: float = 0.1  # regularises small corpora (the built-in one: val 4.79 instead of 5.27 in 180 s)
    tie_embeddings: bool = True  # output head shares the token embedding matrix (GPT-2 does)
    # Architecture switches. GPT-2 is learned/layernorm/gelu with biases; Llama (the default) is
    # rope/rmsnorm/swiglu without biases. benchmarks/ measures each.
    pos: str = "rope"  # "learned" position embeddings (GPT-2) or "rope" (rotary, as in Llama)
    rope_theta: float = 10000.0  # RoPE base: the slowest rotation's period grows with it
    norm: str = "rmsnorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama: no mean subtraction, no bias)
    norm_eps: float = 1e-5  # added to the variance inside every norm
    mlp: str = "swiglu"  # "gelu" (GPT-2), "relu2" (ReLU squared) or "swiglu" (Llama's gated SiLU)
    mlp_hidden: int = 0  # MLP width; 0 = 4 * n_embd, or for swiglu 8/3 * n_embd rounded up to 64 (same size)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention (Qwen3, OLMo 2)

    # Values derived from the fields, computed here once for every module that needs them.

    @property
    def head_size(self) -> int:
        """Channels per attention head: n_embd / n_head (validate checks that it divides)."""
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: mlp_hidden if set, else 4 * n_embd, or for SwiGLU (three matrices
        instead of two) 8/3 * n_embd rounded up to a multiple of 64, which keeps the MLP about as large."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # text files or folders; empty = built-in corpus
    tokenizer: str = "bpe"  # "bpe" (byte-level BPE) or "char" (one token per character)
    vocab_size: int = 4096  # BPE only; a character vocabulary is as large as the character set
    val_fraction: float = 0.1  # the last part of each document is held out for validation
    cache_dir: str = "data/cache"  # prepared token files are kept here and reused
    errors: str = "strict"  # invalid UTF-8: "strict" stops with the position, "replace" uses U+FFFD
    text_column: str = ""  # for .jsonl/.csv/.parquet/saved datasets: the text column (auto if empty)
    tokenizer_sample_bytes: int = 100_000_000  # BPE learns from at most about this much training text (a sample)
    streaming: bool = False  # hf: datasets: stream the rows (read once per pass) instead of downloading first


@dataclass
class TrainConfig:
    batch_size: int = 32  # sequences per micro-batch (in each process)
    grad_accum: int = 1  # micro-batches per optimizer step, shared among the processes (a multiple of their number)
    lr: float = 3e-3  # peak learning rate (eta in w_new = w - eta * dL/dw); with Muon: for the AdamW part
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 30
    weight_decay: float = 0.1  # applied to weight matrices only, never to biases or norm gains
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    max_steps: int = 3000
    max_time: float = 180.0  # seconds; training stops at max_steps or max_time, whichever comes first (0 = no limit)
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    sample_tokens: int = 120  # tokens sampled and logged at every evaluation (0 = none)
    seed: int = 1337
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "auto"  # auto = bfloat16 autocast where the hardware has fast bf16, else float32
    compile: bool = False  # torch.compile the model
    optimizer: str = "muon"  # "adamw", or "muon": Muon for the blocks' weight matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (follows the same warmup and decay as lr)
    max_bad_steps: int = 3  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run
    strategy: str = "ddp"  # with several processes (torchrun): ddp (whole model in each) or fsdp (sharded)
    init_from: str = ""  # a GPT-2 folder (transformers' save_pretrained): start from its weights and tokenizer


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def all_keys() -> list[str]:
    """Every valid `section.field` name."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str) -> UserError:
    if "." not in key:  # a section name
        close = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return UserError(f"unknown config section '{key}'{hint} (sections: {', '.join(SECTIONS)})")
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys are {', '.join(all_keys())}"
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or fail naming the key."""
    kind_name = getattr(kind, "__name__", str(kind))
    bad = UserError(f"config key '{key}' must be {kind_name}, got {value!r}")
    if kind == "list[str]":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise UserError(f"config key '{key}' must be a list of paths, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if kind is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise AssertionError(f"unhandled field type {kind}")


def _field_kind(cls: type, name: str) -> Any:
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    return {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, annotation)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(choices)}, got '{value}'")


def validate(cfg: Config) -> Config:
    """Check values that have the right type but are impossible; return cfg unchanged if all is well."""
    m, d, t = cfg.model, cfg.data, cfg.train

    def positive(key: str, value: float) -> None:
        if not value > 0:
            raise UserError(f"config key '{key}' must be > 0, got {value}")

    def non_negative(key: str, value: float) -> None:
        if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise UserError(f"config key '{key}' must be >= 0, got {value}")

    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        positive(f"model.{key}", getattr(m, key))
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if not 0 <= m.dropout < 1:
        raise UserError(f"config key 'model.dropout' must be in [0, 1), got {m.dropout}")
    _choice("model.pos", m.pos, ("learned", "rope"))
    _choice("model.norm", m.norm, ("layernorm", "rmsnorm"))
    _choice("model.mlp", m.mlp, ("gelu", "relu2", "swiglu"))
    positive("model.rope_theta", m.rope_theta)
    positive("model.norm_eps", m.norm_eps)
    non_negative("model.mlp_hidden", m.mlp_hidden)
    if m.pos == "rope" and m.head_size % 2:
        raise UserError(f"model.pos=rope needs an even head size, got n_embd/n_head = {m.head_size}")

    _choice("data.tokenizer", d.tokenizer, ("bpe", "char"))
    _choice("data.errors", d.errors, ("strict", "replace"))
    if d.tokenizer == "bpe" and d.vocab_size < 257:
        raise UserError(
            f"data.vocab_size must be at least 257 for byte-level BPE (256 bytes + end-of-text), got {d.vocab_size}"
        )
    if d.tokenizer == "bpe" and d.vocab_size > 2**32:
        raise UserError(f"data.vocab_size must be at most {2**32:,} (token ids are stored as uint32), got {d.vocab_size:,}")
    if d.tokenizer_sample_bytes < 1:
        raise UserError(f"config key 'data.tokenizer_sample_bytes' must be > 0, got {d.tokenizer_sample_bytes}")
    if not 0 < d.val_fraction < 1:
        raise UserError(f"config key 'data.val_fraction' must be between 0 and 1, got {d.val_fraction}")

    for key in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval", "max_bad_steps"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.lr", t.lr)
    for key in ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "max_time", "sample_tokens"):
        non_negative(f"train.{key}", getattr(t, key))
    if t.min_lr > t.lr:
        raise UserError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise UserError(f"config key 'train.{key}' must be in [0, 1), got {getattr(t, key)}")
    if t.device not in ("auto", "cpu", "mps") and not t.device.startswith("cuda"):
        raise UserError(f"config key 'train.device' must be auto, cpu, cuda, cuda:N or mps, got '{t.device}'")
    _choice("train.dtype", t.dtype, ("auto", "float32", "bfloat16"))
    _choice("train.strategy", t.strategy, ("ddp", "fsdp"))
    _choice("train.optimizer", t.optimizer, ("adamw", "muon"))
    positive("train.muon_lr", t.muon_lr)
    return cfg


def apply(cfg: Config, values: dict[str, Any], source: str = "command line") -> Config:
    """Set `section.field` keys on cfg (in place) with type coercion; unknown keys name the closest one."""
    for key, value in values.items():
        section, _, name = key.partition(".")
        cls = SECTIONS.get(section)
        if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(key)
        setattr(getattr(cfg, section), name, _coerce(key, value, _field_kind(cls, name)))
    return cfg


def from_dict(raw: Any, source: str = "config") -> Config:
    """Build a Config from nested {section: {field: value}} (as read from YAML), starting from defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected sections model/data/train at the top level, got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    for section, body in raw.items():
        if section not in SECTIONS:
            raise _unknown_key(str(section))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise UserError(f"{source}: section '{section}' must be a mapping of field: value")
        flat.update({f"{section}.{name}": value for name, value in body.items()})
    return apply(Config(), flat, source)


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then overrides; validated."""
    if path is None:
        cfg = Config()
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"config file {p} is not valid YAML: {first}") from None
        cfg = from_dict(raw, source=str(p))
    apply(cfg, overrides or {})
    return validate(cfg)


def parse_override_value(text: str) -> Any:
    """Read a command-line value the way YAML would ("4" -> 4, "true" -> True, "a" -> "a")."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg), encoding="utf-8")


def diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """{'section.field': (old, new)} for every field whose value differs."""
    a, b = old.to_dict(), new.to_dict()
    return {
        f"{s}.{k}": (a[s][k], b[s][k]) for s in SECTIONS for k in a[s] if a[s][k] != b[s][k]
    }
