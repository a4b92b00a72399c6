"""`tinylm train --init_from DIR`: start from a GPT-2 checkpoint folder as transformers saves it.

A randomly initialised `GPT2LMHeadModel` (small config, every bias and norm randomised too) stands in
for the public GPT-2 weights; transformers' own forward pass is the reference for tinylm's logits.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config

from tinylm.errors import UserError
from tinylm.hf import read_pretrained
from tinylm.model import GPT
from tinylm.tokenizer import train_bpe

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

TEXT = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree.\n" * 200


def random_gpt2(vocab_size: int, eot_id: int, tie: bool = True, **config_fields) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=tie, **config_fields)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases start at zero and norm gains at one: make every tensor count
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    tok = train_bpe([TEXT], 320)
    model = random_gpt2(tok.vocab_size, tok.eot_id)
    model.save_pretrained(str(folder))
    tok.save(folder / "tokenizer.json")
    return folder, model


def tinylm_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    pre = read_pretrained(folder)
    model = GPT(pre.model, pre.vocab_size).eval()
    model.load_state_dict(pre.state_for(pre.model))
    with torch.no_grad():
        return model(ids)[0]


def test_random_gpt2_imports_with_equal_logits(gpt2_folder):
    folder, reference = gpt2_folder
    ids = torch.randint(reference.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (tinylm_logits(folder, ids) - expected).abs().max().item() < 1e-4


def test_untied_bare_gpt2model_keys_pytorch_bin_and_vocab_merges(tmp_path):
    """The layout of the original GPT-2 upload: no "transformer." prefix, pytorch_model.bin, vocab.json
    and merges.txt instead of tokenizer.json; and here an untied head, an MLP not 4 x n_embd wide and
    another LayerNorm epsilon as well."""
    tok = train_bpe([TEXT], 320)
    reference = random_gpt2(tok.vocab_size, tok.eot_id, tie=False, n_inner=96, layer_norm_epsilon=1e-6)
    folder = tmp_path / "old"
    folder.mkdir()
    state = {k.removeprefix("transformer."): v.clone() for k, v in reference.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(reference.config.to_json_string())
    tok.tok.model.save(str(folder))  # vocab.json + merges.txt
    ids = torch.randint(tok.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (tinylm_logits(folder, ids) - expected).abs().max().item() < 1e-4
    pre = read_pretrained(folder)
    assert not pre.model.tie_embeddings and pre.model.mlp_hidden == 96 and pre.model.norm_eps == 1e-6
    sample = "The bird sat on the log.<|endoftext|>A cat"
    assert pre.tokenizer.encode(sample) == tok.encode(sample)


def test_fine_tuning_starts_from_the_pretrained_weights(gpt2_folder, tmp_path):
    """The step-0 validation loss of an --init_from run is the loss transformers' model gives on the
    same windows of the corpus, tokenized with the folder's tokenizer."""
    from tinylm.console import Console
    from tinylm.loop import train
    from tinylm.prepare import prepare
    from tinylm.step import evaluate

    folder, reference = gpt2_folder
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = tiny_config(tmp_path, [tmp_path / "corpus.txt"], train={"init_from": str(folder), "max_steps": 4,
                                                                   "eval_interval": 4, "sample_tokens": 0})
    lines: list[str] = []
    result = train(cfg, run_dir=tmp_path / "run", console=Console(lines.append))
    assert any(line.startswith(f"initialised from {folder}: 2 layers, 4 heads, 32 wide, context 32") for line in lines)
    step0 = float(re.search(r"step 0: val loss ([\d.]+)", "\n".join(lines)).group(1))

    prep = prepare(cfg.data, tokenizer=read_pretrained(folder).tokenizer)
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()

    class Reference(torch.nn.Module):  # transformers' forward with tinylm's (logits, loss) signature
        def forward(self, x, y):
            logits = reference(x).logits
            return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    expected = evaluate(Reference(), prep.val, cfg.train, 32, torch.device("cpu"), None, cfg.train.seed + 1)
    assert math.isclose(step0, expected, abs_tol=1e-4)
    from tinylm import config

    saved = config.load(Path(result.run_dir) / "config.yaml")  # the folder's shape, recorded for resume and export
    assert (saved.model.n_layer, saved.model.n_head, saved.model.n_embd, saved.model.block_size) == (2, 4, 32, 32)
    assert saved.train.init_from == str(folder)
    saved.train.max_steps = 6  # a fine-tuning run resumes like any other (same tokenizer, same data)
    assert train(saved, run_dir=result.run_dir, resume=True, console=Console(lines.append)).step == 6

    from tinylm.export import export  # the fine-tuned run exports like any other, and says where it came from

    assert export(result.run_dir, tmp_path / "hf", out=lambda s: None)["max_logit_diff"] < 1e-4
    assert f"fine-tuned from `{folder}`" in (tmp_path / "hf" / "README.md").read_text()


def test_block_size_beyond_the_pretrained_positions_is_refused(gpt2_folder, tmp_path):
    from tinylm.console import QUIET
    from tinylm.loop import train

    folder, _ = gpt2_folder
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = tiny_config(tmp_path, [tmp_path / "corpus.txt"], model={"block_size": 128}, train={"init_from": str(folder)})
    with pytest.raises(UserError, match="model.block_size=128 exceeds the 64 positions"):
        train(cfg, run_dir=tmp_path / "run", console=QUIET)


def test_init_from_a_missing_folder_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init_from", str(tmp_path / "gpt2")],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: pretrained model folder not found: {tmp_path / 'gpt2'}\n"


def test_non_gpt2_folders_are_refused_with_the_reason(gpt2_folder, tmp_path):
    folder, _ = gpt2_folder
    for change, message in (({"model_type": "bert"}, "tinylm imports GPT-2 .*, Llama .* and Qwen3"),
                            ({"activation_function": "relu"}, "GELU's tanh form")):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        config = {**json.loads((folder / "config.json").read_text()), **change}
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(UserError, match=message):
            read_pretrained(bad)
    with pytest.raises(UserError, match="no config.json"):
        read_pretrained(tmp_path)
