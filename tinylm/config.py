"""Typed configuration: three sections (`model`, `data`, `train`), YAML files, command-line overrides.

A config file is YAML with those three sections, named by its path or, for the recipes in `configs/`
(shipped inside the package too), by its name (`small`); any field can be overridden on the command
line as `--section.field=value`. The dataclass defaults below *are* the default recipe
(`configs/default.yaml` spells out the same values, and a test keeps the two equal), and each field's
help text, given where it is defined, is its documentation (`tinylm.confdoc` renders it).

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

from tinylm import configfile
from tinylm.errors import UserError, shown

MAX_SEED = 2**32 - 1


def setting(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A config field with its documentation: the one place a setting is explained.

    `help` feeds `tinylm train --help` and docs/config.md (see `tinylm.confdoc`); `choices`, when given,
    are the only values `validate` accepts, and the help lists them.
    """
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):  # a mutable default: each Config gets its own copy
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The transformer's shape and architecture. GPT-2 is pos=learned, norm=layernorm, mlp=gelu with
    biases; Llama (the default) is pos=rope, norm=rmsnorm, mlp=swiglu without biases; benchmarks/
    measures each."""

    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads per block; each head is n_embd / n_head wide")
    n_kv_head: int = setting(0, "key/value heads (grouped-query attention, as in Llama 2 70B and Llama 3: each "
                                "shares its keys and values with n_head / n_kv_head query heads, which shrinks "
                                "the KV cache and the qkv projection); 0 = n_head, every head its own")
    n_embd: int = setting(256, "width of every token vector (the embedding size)")
    block_size: int = setting(128, "context length: how many tokens the model sees at once")
    bias: bool = setting(False, "biases in Linear and LayerNorm layers (the b in y = w*x + b); off (Llama) is as "
                                "good and faster, true (GPT-2) adds a bias to every layer")
    dropout: float = setting(0.1, "fraction of activations zeroed while training, against overfitting a small text "
                                  "(the built-in corpus, seen about 10 times: 0.1 gave val loss 4.79, 0 gave 5.27); "
                                  "on the embeddings and each attention and MLP output, not the attention weights")
    tie_embeddings: bool = setting(True, "the output head shares the token embedding matrix (GPT-2 does); the planner "
                                          "unties it for characters")
    pos: str = setting("rope", "position information: learned (GPT-2's table of position embeddings) or rope "
                               "(rotary, as in Llama)", ("learned", "rope"))
    rope_theta: float = setting(10000.0, "RoPE base: the slowest rotation's period grows with it")
    norm: str = setting("rmsnorm", "layernorm (GPT-2) or rmsnorm (Llama: no mean subtraction, no bias)",
                        ("layernorm", "rmsnorm"))
    norm_eps: float = setting(1e-5, "added to the variance inside every norm")
    mlp: str = setting("swiglu", "gelu (GPT-2), relu2 (ReLU squared) or swiglu (Llama's gated SiLU)",
                       ("gelu", "relu2", "swiglu"))
    mlp_hidden: int = setting(0, "MLP width; 0 = 4 x n_embd, or for swiglu 8/3 x n_embd rounded up to a multiple "
                                 "of 64 (its three matrices then hold as many parameters as two at 4 x n_embd)")
    qk_norm: bool = setting(False, "RMSNorm on each head's queries and keys before attention (Qwen3, OLMo 2); the "
                                    "planner turns it on")
    zero_init: bool = setting(False, "start the attention and MLP output projections and an untied head at zero "
                                     "(every block starts as the identity); the planner turns it on")

    # Values derived from the fields, computed here once for every module that needs them.

    @property
    def head_size(self) -> int:
        """Channels per attention head: n_embd / n_head (validate checks that it divides)."""
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is 0 (plain multi-head attention)."""
        return self.n_kv_head or self.n_head

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
    """What text to learn from and how it becomes token ids (prepared once, then cached)."""

    paths: list[str] = setting([], "text files, folders (every .txt in them, recursively), .jsonl/.json/.csv/"
                                   ".parquet files, saved datasets or hf:NAME[@REVISION][:CONFIG][:SPLIT] Hub "
                                   "datasets; empty = the built-in corpus (Python's reference docs, pydoc_data)")
    tokenizer: str = setting("bpe", "bpe (byte-level BPE) or char (one token per character)", ("bpe", "char"))
    vocab_size: int = setting(4096, "BPE only; a character vocabulary is as large as the character set")
    val_fraction: float = setting(0.1, "the last part of each document is held out for validation")
    cache_dir: str = setting("data/cache", "prepared token files are kept here and reused")
    errors: str = setting("strict", "invalid UTF-8: strict stops with the position, replace uses U+FFFD",
                          ("strict", "replace"))
    text_column: str = setting("", "for .jsonl/.csv/.parquet/saved datasets: the text column (auto if empty)")
    tokenizer_sample_bytes: int = setting(100_000_000, "BPE learns from at most about this much training text "
                                                       "(a sample)")
    streaming: bool = setting(False, "hf: datasets: stream the rows (read once per pass) instead of downloading "
                                     "them first")


@dataclass
class TrainConfig:
    """The optimizer, its schedule, when to stop, evaluate and log, and where to run."""

    batch_size: int = setting(32, "sequences per micro-batch (in each process)")
    grad_accum: int = setting(1, "micro-batches per optimizer step, shared among the processes (whole ones when "
                                 "a multiple of their number, else each micro-batch's sequences)")
    lr: float = setting(3e-3, "peak learning rate (eta in w_new = w - eta * dL/dw); with Muon: for the AdamW part")
    min_lr: float = setting(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = setting(30, "steps of linear warmup to lr; Muon needs little (30 beat 100 in 60 s and "
                                    "90 s runs)")
    weight_decay: float = setting(0.1, "applied to weight matrices only, never to biases or norm gains")
    beta1: float = setting(0.9, "AdamW's decay rate for its running mean of gradients")
    beta2: float = setting(0.99, "AdamW's decay rate for its running mean of squared gradients")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    max_steps: int = setting(3000, "optimizer steps at most; the learning rate's decay is timed to whichever of "
                                   "max_steps and max_time ends the run")
    max_time: float = setting(180.0, "seconds of training at most (0 = no limit); the run stops at max_steps or "
                                     "max_time, whichever comes first")
    eval_interval: int = setting(250, "steps between evaluations (validation loss, a sample) and checkpoint saves; "
                                      "one that would come within half a spacing of an evaluation at one of the "
                                      "evals marks is left to that one")
    evals: int = setting(8, "evaluations spread evenly over the run besides eval_interval's (each at the next "
                            "eighth, for 8, of the way to max_steps or max_time, whichever is nearer), so any "
                            "run has at least this many whatever the machine's speed (0 = eval_interval only)")
    save_interval: float = setting(60.0, "seconds of training between checkpoints at most, evaluations or not: a "
                                         "kill loses at most about this much work (0 = at evaluations only)")
    eval_batches: int = setting(20, "batches each loss estimate averages (the same ones every time)")
    log_interval: int = setting(10, "steps between logged training losses (the only host sync of a step)")
    sample_tokens: int = setting(120, "tokens sampled and logged at every evaluation (0 = none)")
    seed: int = setting(1337, "random seed: initial weights, batches, dropout, samples")
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = setting("auto", "autocast precision of the matrix products (weights stay float32). auto = "
                                 "bfloat16 where the hardware has it natively (GPUs from Ampere on, CPUs with "
                                 "AVX-512 BF16/AMX), float16 on older GPUs (T4, V100), else float32. float16 "
                                 "trains with loss scaling (torch.amp.GradScaler): see docs/hardware.md",
                         ("auto", "float32", "bfloat16", "float16"))
    compile: str = setting("auto", "torch.compile the model: auto compiles on a CUDA GPU when the run's time budget "
                                   "repays the expected compile time (measured on this machine after the first "
                                   "compiled run, see docs/hardware.md), never on a CPU, where compiling outweighs "
                                   "its gain in a run of minutes", ("auto", "true", "false"))
    optimizer: str = setting("muon", "adamw, or muon: Muon for the blocks' weight matrices, AdamW for "
                                     "embeddings and gains", ("adamw", "muon"))
    muon_lr: float = setting(0.02, "Muon's peak learning rate (follows the same warmup and decay as lr)")
    max_bad_steps: int = setting(3, "a step with a non-finite loss or gradient is skipped; this many in a row "
                                    "stop the run")
    strategy: str = setting("ddp", "with several processes (torchrun): ddp (whole model in each) or fsdp "
                                   "(sharded)", ("ddp", "fsdp"))
    plan: str = setting("auto", "auto: choose the model's shape, batch size, dropout, warmup and eval_batches from "
                                "the time budget, the corpus's size and this machine's measured speed "
                                "(docs/planner.md); every setting given in a config file or on the command line "
                                "wins over the plan. off: the fixed defaults", ("auto", "off"))
    init_from: str = setting("", "a GPT-2 or Llama-family folder (transformers' save_pretrained, tinylm export's "
                                 "among them) to fine-tune: its weights, shape and tokenizer")
    probe: str = setting("", "a text the model reads at every evaluation: its next-token candidates, loss per token "
                             "and attention maps go to TensorBoard (probe/); empty = a fixed line of the validation "
                             "split, none = no probe")
    track: str = setting("", "scalar parameters followed every log_interval steps with their gradient and optimizer "
                             "moments (track/), as NAME[I,J] separated by commas, e.g. blocks.0.mlp.fc.weight[3,5]; "
                             "empty = one weight w[i,j] of the first MLP with its neuron's bias b[i] or, without biases, "
                             "the norm gain its input j passes through; none = nothing")
    keep_snapshots: int = setting(3, "the checkpoints of this many latest evaluations are kept in snapshots/, with "
                                     "the best one (tinylm explain RUN --compare A B), 0 = none")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Every `section.field` set by a config file or an override (`apply`): the user's, which the planner
    # (tinylm/plan.py) leaves alone. Not a setting: config.yaml and comparisons ignore it.
    explicit: set[str] = field(default_factory=set, compare=False, repr=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}


def all_keys() -> list[str]:
    """Every valid `section.field` name."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str) -> UserError:
    if "." not in key:  # a section name
        close = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return UserError(f"unknown config section {shown(key)}{hint} (sections: {', '.join(SECTIONS)})")
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys are {', '.join(all_keys())}"
    return UserError(f"unknown config key {shown(key)}{hint}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or fail naming the key."""
    kind_name = getattr(kind, "__name__", str(kind))
    bad = UserError(f"config key '{key}' must be {kind_name}, got {shown(value)}")
    if kind == "list[str]":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise UserError(f"config key '{key}' must be a list of paths, got {shown(value)}")
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
        if isinstance(value, bool):  # YAML's true/false for a setting with choices such as "auto", "true", "false"
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    raise AssertionError(f"unhandled field type {kind}")


def _field_kind(cls: type, name: str) -> Any:
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    return {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, annotation)


def _check_choices(cfg: Config) -> None:
    """Every field declared with `choices` holds one of them."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            value, choices = getattr(getattr(cfg, section), f.name), f.metadata["choices"]
            if choices and value not in choices:
                raise UserError(f"config key '{section}.{f.name}' must be one of {', '.join(choices)}, got {shown(value)}")


def validate(cfg: Config) -> Config:
    """Check values that have the right type but are impossible; return cfg unchanged if all is well."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _check_choices(cfg)

    def positive(key: str, value: float) -> None:
        if not value > 0:
            raise UserError(f"config key '{key}' must be > 0, got {shown(value)}")

    def non_negative(key: str, value: float) -> None:
        if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise UserError(f"config key '{key}' must be >= 0, got {shown(value)}")

    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        positive(f"model.{key}", getattr(m, key))
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    non_negative("model.n_kv_head", m.n_kv_head)
    if m.n_head % m.kv_heads:
        raise UserError(f"model.n_head ({m.n_head}) must be divisible by model.n_kv_head ({m.n_kv_head}): "
                        "each key/value head serves the same number of query heads")
    if not 0 <= m.dropout < 1:
        raise UserError(f"config key 'model.dropout' must be in [0, 1), got {m.dropout}")
    positive("model.rope_theta", m.rope_theta)
    positive("model.norm_eps", m.norm_eps)
    non_negative("model.mlp_hidden", m.mlp_hidden)
    if m.pos == "rope" and m.head_size % 2:
        raise UserError(f"model.pos=rope needs an even head size, got n_embd/n_head = {m.head_size}")

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
    for key in ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "max_time", "sample_tokens", "evals",
                "save_interval", "keep_snapshots"):
        non_negative(f"train.{key}", getattr(t, key))
    if t.min_lr > t.lr:
        raise UserError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise UserError(f"config key 'train.{key}' must be in [0, 1), got {getattr(t, key)}")
    if not 0 <= t.seed <= MAX_SEED:  # numpy's seeding takes 32 bits
        raise UserError(f"config key 'train.seed' must be between 0 and {MAX_SEED:,} (2**32 - 1), got {shown(t.seed)}")
    check_device(t.device, "config key 'train.device'")
    positive("train.muon_lr", t.muon_lr)
    return cfg


def check_device(name: str, what: str) -> None:
    """One line unless `name` is a device tinylm knows how to ask for (whether it is here is
    tinylm.hardware.pick_device's question). `what` names where the value came from."""
    index = name.partition(":")[2]
    if name not in ("auto", "cpu", "mps", "cuda") and not (name.startswith("cuda:") and index.isdigit()):
        raise UserError(f"{what} must be auto, cpu, cuda, cuda:N or mps, got {shown(name)}")


def apply(cfg: Config, values: dict[str, Any], source: str = "command line") -> Config:
    """Set `section.field` keys on cfg (in place) with type coercion; unknown keys name the closest one."""
    for key, value in values.items():
        section, _, name = key.partition(".")
        cls = SECTIONS.get(section)
        if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(key)
        setattr(getattr(cfg, section), name, _coerce(key, value, _field_kind(cls, name)))
        cfg.explicit.add(key)
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
    """Defaults, then the YAML file at `path` or the recipe of that name (if any), then overrides; validated."""
    if path is None:
        cfg = Config()
    else:
        p = configfile.resolve(path)
        cfg = from_dict(configfile.read_yaml(p), source=str(p))
    apply(cfg, overrides or {})
    return validate(cfg)


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
