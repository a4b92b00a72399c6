"""`tinylm train --init_from DIR` with Llama-family folders: randomly initialised `LlamaForCausalLM` models
built from configs by transformers (no downloads) import with transformers' logits; tinylm's own exports
come back as the same model; what tinylm's model cannot compute is refused with the reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import markov_text, tiny_config

from tinylm.console import Console
from tinylm.errors import UserError
from tinylm.hf import read_pretrained
from tinylm.tokenizer import train_bpe

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
from test_import import TEXT, tinylm_logits  # noqa: E402  (GPT-2's import tests: the same corpus and reader)


def random_llama(vocab_size: int, **fields) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, **fields)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains start at one and biases at zero: make every tensor count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    return model


def save_llama(folder: Path, **fields) -> torch.nn.Module:
    tok = train_bpe([TEXT], 320)
    model = random_llama(tok.vocab_size, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, **fields)
    model.save_pretrained(str(folder))
    tok.save(folder / "tokenizer.json")
    return model


@pytest.mark.parametrize("fields", [
    {"num_key_value_heads": 2, "tie_word_embeddings": False},
    {"num_key_value_heads": 1, "tie_word_embeddings": True, "rope_theta": 500.0, "rms_norm_eps": 1e-5},
    {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
], ids=["gqa-untied", "mqa-tied-theta-eps", "mha-biases"])
def test_random_llama_imports_with_equal_logits(tmp_path, fields):
    reference = save_llama(tmp_path / "llama", **fields)
    ids = torch.randint(reference.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (tinylm_logits(tmp_path / "llama", ids) - expected).abs().max().item() < 1e-4
    m = read_pretrained(tmp_path / "llama").model
    assert m.kv_heads == fields["num_key_value_heads"] and m.mlp_width == 96 and m.pos == "rope"
    assert m.tie_embeddings == fields.get("tie_word_embeddings", False) and m.bias == fields.get("attention_bias", False)


@pytest.mark.usefixtures("one_thread")
def test_an_export_imports_as_the_same_model(tmp_path):
    """A grouped-query tinylm run exported as LlamaForCausalLM, then fine-tuned with --init_from: its
    step-0 validation loss is the exported run's final one (same weights, same windows, same tokenizer)."""
    from tinylm import rundir
    from tinylm.export import export
    from tinylm.loop import train

    (tmp_path / "m.txt").write_text(markov_text(20_000))
    model = {"n_head": 4, "n_kv_head": 2, "tie_embeddings": False, "rope_theta": 300.0}
    cfg = tiny_config(tmp_path, [tmp_path / "m.txt"], model=model, data={"tokenizer": "bpe", "vocab_size": 280},
                      train={"max_steps": 12, "eval_interval": 12, "sample_tokens": 0})
    first = train(cfg, run_dir=tmp_path / "run", console=Console(lambda line: None))
    result = export(first.run_dir, tmp_path / "hf", out=lambda line: None)
    assert result["architecture"] == "llama" and result["max_logit_diff"] < 1e-4  # transformers agrees
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 2

    ids = torch.randint(280, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = rundir.load(first.run_dir).model(ids)[0]
    assert torch.allclose(tinylm_logits(tmp_path / "hf", ids), trained, atol=1e-5)

    tuned = tiny_config(tmp_path, [tmp_path / "m.txt"], train={"init_from": str(tmp_path / "hf"), "max_steps": 2,
                                                               "eval_interval": 2, "sample_tokens": 0})
    lines: list[str] = []
    train(tuned, run_dir=tmp_path / "tuned", console=Console(lines.append))
    step0 = float(re.search(r"step 0: val loss ([\d.]+)", "\n".join(lines)).group(1))
    assert step0 == pytest.approx(first.metrics["val_loss"], abs=1e-4)
    assert any("grouped-query attention (2 key/value heads for 4 query heads)" in line for line in lines)


def edited(folder: Path, out: Path, **changes) -> Path:
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = {**json.loads((folder / "config.json").read_text()), **changes}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "tiny-llama"
    save_llama(folder, num_key_value_heads=2)
    return folder


@pytest.mark.parametrize("changes, reason", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None}, "'llama3' rope scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "'linear' rope scaling"),
    ({"sliding_window": 16}, "sliding window of 16 tokens"),
    ({"num_local_experts": 8}, "mixture of experts"),
    ({"head_dim": 32}, "head_dim is 32, not hidden_size / num_attention_heads = 16"),
    ({"attention_bias": True}, "biases in its attention or in its MLP but not both"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"num_key_value_heads": 3}, "3 key/value heads do not divide the 4 heads"),
    ({"model_type": "mistral"}, "model_type is 'mistral'; it has Mistral's sliding-window attention"),
    ({"model_type": "qwen2"}, "Qwen2's biases on q, k and v but not on the output projection"),
], ids=["llama3-scaling", "linear-scaling", "sliding-window", "moe", "head_dim", "attention-bias-only", "gelu",
        "kv-heads", "mistral", "qwen2"])
def test_what_tinylm_cannot_compute_is_refused_with_the_reason(llama_folder, tmp_path, changes, reason):
    with pytest.raises(UserError, match=re.escape(reason)):
        read_pretrained(edited(llama_folder, tmp_path / "bad", **changes))


def test_weights_the_config_does_not_describe_are_refused(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = edited(llama_folder, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # a bias config.json says is not there
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"its weights hold model.layers.0.self_attn.q_proj.bias, which its config.json"):
        read_pretrained(bad)


def test_random_qwen3_imports_with_equal_logits_and_its_other_sizes_are_refused(tmp_path):
    """Qwen3 is Llama with QK-norm (what planned tinylm runs export as): a random one from transformers whose heads
    split the width evenly imports logit for logit; Qwen3's usual head_dim, and a sliding window, are refused."""
    tok = train_bpe([TEXT], 320)
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    reference = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # gains away from one, so that a q_norm or k_norm left out shows
        for name, p in reference.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5)
    reference.save_pretrained(str(tmp_path / "qwen3"))
    tok.save(tmp_path / "qwen3" / "tokenizer.json")
    ids = torch.randint(tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (tinylm_logits(tmp_path / "qwen3", ids) - expected).abs().max().item() < 1e-4
    m = read_pretrained(tmp_path / "qwen3").model
    assert m.qk_norm and m.kv_heads == 2 and not m.tie_embeddings
    for changes, reason in (({"head_dim": 128}, "head_dim is 128, not hidden_size / num_attention_heads = 16"),
                            ({"use_sliding_window": True, "sliding_window": 32}, "sliding window of 32 tokens")):
        with pytest.raises(UserError, match=re.escape(reason)):
            read_pretrained(edited(tmp_path / "qwen3", tmp_path / f"q{len(reason)}", **changes))
