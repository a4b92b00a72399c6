"""`tinylm export RUN_DIR OUT_DIR`: a trained run as a Hugging Face model folder.

The folder holds what `transformers` needs to load the model offline, and nothing tinylm-specific:

    config.json              the architecture (GPT2LMHeadModel or LlamaForCausalLM), transformers' schema
    model.safetensors        the weights (float32; a tied head is stored once)
    tokenizer.json           tinylm's tokenizer, unchanged
    tokenizer_config.json    PreTrainedTokenizerFast over it, <|endoftext|> as bos/eos/unk
    special_tokens_map.json
    generation_config.json   tinylm sample's defaults: sampling at temperature 0.8, stop at <|endoftext|>
    README.md                a model card: training config, data, parameter count, final val loss
                             (from the run's metrics.json)

so that afterwards

    from transformers import pipeline
    pipeline("text-generation", model=OUT_DIR)("The", max_new_tokens=40)

works. `transformers` is not needed to write the folder; when it is installed the export loads the folder
back and checks that its logits equal tinylm's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from tinylm import hf, rundir
from tinylm.errors import UserError
from tinylm.tokenizer import EOT

WRITTEN = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "generation_config.json", "README.md")


def tokenizer_files(block_size: int) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json: a PreTrainedTokenizerFast over tokenizer.json
    with GPT-2's conventions (<|endoftext|> is bos, eos and unk; nothing added around the text)."""
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": block_size,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the text exactly, spaces included
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def generation_config(eot_id: int, block_size: int) -> dict[str, Any]:
    return {
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
        "max_length": block_size,  # the longest text it was trained on (GPT-2: it has no further positions)
    }


def result_line(metrics: dict | None, state: dict) -> str:
    """The model card's result: the run's last evaluation (metrics.json), else the checkpoint's best val loss."""
    if metrics and {"val_loss", "val_bpb", "eval_step", "best_val_loss"} <= metrics.keys():
        return (f"final val loss {metrics['val_loss']:.4f} at step {metrics['eval_step']:,} "
                f"({metrics['val_bpb']:.3f} bits per byte); best {metrics['best_val_loss']:.4f}")
    return f"best val loss {state.get('best_val', float('nan')):.4f}"


def model_card(run_dir: Path, out_dir: Path, cfg, data: dict, state: dict, n_params: int, arch: str) -> str:
    m = cfg.model
    result = result_line(rundir.read_metrics(run_dir), state)
    sources = data.get("sources", [])
    shown = ", ".join(f"`{s}`" for s in sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
    tokenizer = "byte-level BPE" if data.get("tokenizer") == "bpe" else "characters"
    origin = f"fine-tuned from `{cfg.train.init_from}`" if cfg.train.init_from else "trained from scratch"
    context = (f"The model has no positions beyond its context of {m.block_size} tokens, so generation stops there."
               if arch == "gpt2" else
               f"It was trained on {m.block_size}-token windows; generation stops there by default.")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- tinylm
- {arch}
---

# {run_dir.name}

A {n_params:,}-parameter language model {origin} with tinylm and exported as `{hf.ARCHITECTURES[arch]}`.

| | |
|---|---|
| architecture | {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size} tokens |
| parameters | {n_params:,} |
| tokenizer | {tokenizer}, {state['vocab_size']:,} tokens; `{EOT}` separates documents |
| data | {shown or 'built-in corpus'}: {data.get('train_tokens', 0):,} training tokens, {data.get('val_tokens', 0):,} validation tokens |
| training | {state.get('step', 0):,} steps, {state.get('tokens', 0):,} tokens, {state.get('elapsed', 0):.0f} s |
| result | {result} |

## Use

```python
from transformers import pipeline

generate = pipeline("text-generation", model="{out_dir}")
print(generate("The", max_new_tokens=40)[0]["generated_text"])
```

The generation config samples at temperature 0.8 among the 50 most likely tokens; pass
`do_sample=False` for greedy decoding. {context}

## Training config

```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()}
```
"""


def check_with_transformers(out_dir: Path, model: torch.nn.Module, vocab_size: int) -> float | None:
    """Load the folder with transformers (if installed) and return the largest logit difference."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
    except ImportError:
        return None
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a "Loading weights" bar for a check that takes a moment
    try:
        theirs = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    finally:
        if bar:
            logging.enable_progress_bar()
    ids = torch.randint(vocab_size, (1, min(16, model.cfg.block_size)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = model(ids)
        got = theirs(ids).logits
    return (got - expected).abs().max().item()


def export(run_dir: str | Path, out_dir: str | Path, force: bool = False,
           out: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the Hugging Face folder for the run in run_dir; return what was written and checked."""
    from safetensors.torch import save_file

    from tinylm.anatomy import parameter_summary, parameter_table

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, tok, model, state = rundir.load(run_dir, "cpu")
    arch = hf.architecture(cfg.model)  # refuses what transformers cannot express, saying why
    taken = [name for name in WRITTEN if (out_dir / name).exists()]
    if taken and not force:
        raise UserError(f"{out_dir} already holds an export ({taken[0]}); choose another folder or pass --force")
    vocab_size = state["vocab_size"]
    config, tensors = hf.to_hf(arch, cfg.model, model.state_dict(), vocab_size, tok.eot_id)
    data = rundir.read_data(run_dir)
    n_params = parameter_summary(parameter_table(model))["total"]
    try:  # an OUT_DIR that is a file, unwritable, or on a full disk: one line
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(run_dir / rundir.TOKENIZER, out_dir / "tokenizer.json")  # the same format
        for name, content in tokenizer_files(cfg.model.block_size).items():
            (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
        (out_dir / "generation_config.json").write_text(
            json.dumps(generation_config(tok.eot_id, cfg.model.block_size), indent=2) + "\n")
        (out_dir / "README.md").write_text(model_card(run_dir, out_dir, cfg, data, state, n_params, arch))
    except OSError as e:
        raise UserError(f"cannot write the export to {out_dir}: {e.strerror or e}") from None

    out(f"exported {run_dir} as {hf.ARCHITECTURES[arch]} ({n_params:,} parameters) to {out_dir}")
    diff = check_with_transformers(out_dir, model, vocab_size)
    if diff is None:
        out("transformers is not installed here, so the folder was not loaded back. To use it:\n"
            "  pip install 'tinylm[hf]'   (or: pip install transformers)\n"
            f"  python -c \"from transformers import pipeline; print(pipeline('text-generation', model='{out_dir}')('The')[0]['generated_text'])\"")
    else:
        if diff > 1e-3:  # a mapping bug, not a user error: keep the traceback
            raise AssertionError(f"transformers' logits differ from tinylm's by {diff:.3g} after export")
        out(f"checked: transformers loads it and its logits match tinylm's (largest difference {diff:.1e})\n"
            f"  python -c \"from transformers import pipeline; print(pipeline('text-generation', model='{out_dir}')('The')[0]['generated_text'])\"")
    return {"out_dir": str(out_dir), "architecture": arch, "parameters": n_params, "max_logit_diff": diff}
