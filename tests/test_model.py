import math

import pytest
import torch

from tinylm import checkpoint
from tinylm.config import ModelConfig
from tinylm.model import GPT, format_parameter_table, parameter_summary, parameter_table


def small(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, **kw})


def test_output_shapes():
    model = GPT(small(), vocab_size=50)
    idx = torch.randint(50, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 50) and loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50) and loss.shape == ()


def test_loss_at_initialisation_is_ln_vocab():
    # GPT-2 init makes every logit near 0, so the model starts out predicting all tokens equally.
    torch.manual_seed(0)
    model = GPT(small(n_embd=64), vocab_size=1000)
    idx = torch.randint(1000, (8, 16))
    _, loss = model(idx, torch.randint(1000, (8, 16)))
    assert abs(loss.item() - math.log(1000)) < 0.05


def test_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True), vocab_size=50257)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert parameter_summary(parameter_table(model))["total"] == 124_439_808


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_accounting_adds_up(bias, tied):
    model = GPT(small(bias=bias, tie_embeddings=tied), vocab_size=50)
    rows = parameter_table(model)
    s = parameter_summary(rows)
    assert s["total"] == sum(p.numel() for p in model.parameters())
    assert s["weights"] + s["biases"] == s["total"]
    assert s["embedding"] + s["non_embedding"] == s["total"]
    c = small()
    # biases: per block qkv (3C) + proj (C) + fc (4C) + mlp proj (C) + 2 norms (2C), plus the final norm (C)
    assert s["biases"] == (c.n_layer * 11 * c.n_embd + c.n_embd if bias else 0)
    assert s["embedding"] == 50 * 32 + 16 * 32  # an untied output head is an ordinary weight matrix
    assert s["kind:weight"] == c.n_layer * 12 * c.n_embd**2 + (0 if tied else 50 * 32)
    table = format_parameter_table(rows, c.n_layer, tied)
    assert f"total {s['total']:,}" in table and ("tied to tok_emb.weight" in table) == tied


def test_tied_head_shares_the_embedding():
    model = GPT(small(), vocab_size=50)
    assert model.head.weight is model.tok_emb.weight


def test_cached_forward_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(small(), vocab_size=50).eval()
    idx = torch.randint(50, (1, 12))
    full, _ = model(idx)
    cache = model.new_cache()
    first, _ = model(idx[:, :5], cache=cache)  # prefill five tokens, then one at a time
    steps = [model(idx[:, i : i + 1], cache=cache)[0] for i in range(5, 12)]
    assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=1e-5)


def test_sequence_longer_than_context_is_refused():
    model = GPT(small(), vocab_size=50)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_checkpoint_save_load_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(small(), vocab_size=50)
    checkpoint.save({"model": model.state_dict()}, tmp_path / "c.pt")
    clone = GPT(small(), vocab_size=50)
    clone.load_state_dict(checkpoint.load(tmp_path / "c.pt")["model"])
    idx = torch.randint(50, (2, 16))
    assert torch.equal(model(idx)[0], clone(idx)[0])
    assert clone.head.weight is clone.tok_emb.weight  # still tied after loading
