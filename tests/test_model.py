import math

import pytest
import torch

from tinylm import checkpoint
from tinylm.anatomy import describe_architecture, format_parameter_table, parameter_summary, parameter_table
from tinylm.config import ModelConfig
from tinylm.model import GPT, apply_rope, rope_tables

GPT2 = {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False}
LLAMA = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False, "bias": False}
# Every architecture switch, on its own on top of GPT-2, and the Llama combination with and without biases.
ARCHITECTURES = {
    "gpt2": GPT2,
    "rope": {**GPT2, "pos": "rope"},
    "rmsnorm": {**GPT2, "norm": "rmsnorm"},
    "swiglu": {**GPT2, "mlp": "swiglu"},
    "relu2": {**GPT2, "mlp": "relu2"},
    "qk_norm": {**GPT2, "qk_norm": True},
    "untied": {**GPT2, "tie_embeddings": False},
    "llama": LLAMA,
    "llama+bias": {**LLAMA, "bias": True},
    "llama+qk_norm": {**LLAMA, "qk_norm": True},
    "llama+gqa": {**LLAMA, "n_kv_head": 1},  # grouped-query attention: every query head shares one key/value head
    "gpt2+gqa+qk_norm": {**GPT2, "n_kv_head": 1, "qk_norm": True, "bias": True},
}


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
        model = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, **GPT2), vocab_size=50257)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert parameter_summary(parameter_table(model))["total"] == 124_439_808


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_accounting_adds_up(bias, tied):
    model = GPT(small(bias=bias, tie_embeddings=tied, **GPT2), vocab_size=50)
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


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_cached_forward_matches_full_forward(arch):
    torch.manual_seed(0)
    model = GPT(small(**ARCHITECTURES[arch]), vocab_size=50).eval()
    idx = torch.randint(50, (1, 12))
    full, _ = model(idx)
    cache = model.new_cache()
    first, _ = model(idx[:, :5], cache=cache)  # prefill five tokens, then one at a time
    steps = [model(idx[:, i : i + 1], cache=cache)[0] for i in range(5, 12)]
    assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=1e-5)


def test_dropout_zeroes_block_outputs_but_never_attention_weights():
    """Dropout drops the attention's output (after its projection), not the attention weights: with the output
    dropout taken out, attention in training mode computes exactly what it does in eval mode."""
    model = GPT(small(dropout=0.5), vocab_size=50)
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, 32)
    rope = rope_tables(16, 16, 10000.0)
    attn.train()
    dropped = attn(x, rope)
    assert (dropped == 0).float().mean() > 0.3  # the output dropout works
    attn.resid_dropout = torch.nn.Identity()
    trained = attn(x, rope)
    attn.eval()
    assert torch.equal(trained, attn(x, rope))


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
    model.eval(), clone.eval()  # no dropout: the same weights must give the same logits
    assert torch.equal(model(idx)[0], clone(idx)[0])
    assert clone.head.weight is clone.tok_emb.weight  # still tied after loading


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_every_architecture_learns(arch):
    # A few AdamW steps on one fixed batch: any wiring mistake (a switch that breaks the gradient path
    # or the causal mask) shows up as a loss that does not fall.
    torch.manual_seed(0)
    model = GPT(small(**ARCHITECTURES[arch]), vocab_size=50)
    x, y = torch.randint(50, (4, 16)), torch.randint(50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0 and math.isfinite(losses[-1])


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_parameter_count_matches_hand_count(arch):
    c = small(**ARCHITECTURES[arch])
    C, V, hs, L = c.n_embd, 50, c.n_embd // c.n_head, c.n_layer  # by hand, not c.head_size
    K = (c.n_kv_head or c.n_head) * hs  # the keys' (and the values') width
    hidden = c.mlp_width
    mlp = (3 if c.mlp == "swiglu" else 2) * C * hidden + (hidden * (2 if c.mlp == "swiglu" else 1) + C if c.bias else 0)
    attn = C * (C + 2 * K) + C * C + (2 * C + 2 * K if c.bias else 0) + (2 * hs if c.qk_norm else 0)
    norm = C + (C if c.bias and c.norm == "layernorm" else 0)  # a gain, and a bias for LayerNorm with biases
    expected = L * (attn + mlp + 2 * norm) + norm + V * C + (0 if c.tie_embeddings else V * C)
    expected += c.block_size * C if c.pos == "learned" else 0
    model = GPT(c, vocab_size=V)
    s = parameter_summary(parameter_table(model))
    assert s["total"] == sum(p.numel() for p in model.parameters()) == expected
    assert s["biases"] == (0 if not c.bias else L * (2 * C + 2 * K + hidden * (2 if c.mlp == "swiglu" else 1) + C
                                                     + (2 * C if c.norm == "layernorm" else 0)) + (C if c.norm == "layernorm" else 0))


def test_swiglu_width_keeps_the_mlp_about_the_same_size():
    for n_embd in (128, 256, 384, 768):
        c = ModelConfig(n_embd=n_embd, n_head=4, mlp="swiglu")
        assert c.mlp_width % 64 == 0 and abs(3 * c.mlp_width - 8 * n_embd) <= 3 * 64
    assert ModelConfig(n_embd=384, n_head=6, mlp="swiglu").mlp_width == 1024
    assert ModelConfig(n_embd=384, n_head=6, mlp="gelu").mlp_width == 1536
    assert ModelConfig(n_embd=384, n_head=6, mlp="swiglu", mlp_hidden=100).mlp_width == 100


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=str)
def test_the_model_is_built_with_the_configs_derived_sizes(arch):
    c = small(**ARCHITECTURES[arch], n_head=4)
    assert c.head_size == 8  # 32 channels over 4 heads
    with torch.device("meta"):
        model = GPT(c, vocab_size=50)
    block = model.blocks[0]
    assert block.mlp.proj.in_features == c.mlp_width
    assert block.mlp.fc.out_features == (2 if c.mlp == "swiglu" else 1) * c.mlp_width
    assert model.new_cache().k.shape[-1] == c.head_size
    assert model.new_cache().k.shape[2] == (c.n_kv_head or c.n_head)  # the cache holds the key/value heads only
    assert block.attn.qkv.out_features == c.n_embd + 2 * (c.n_kv_head or c.n_head) * c.head_size
    if c.pos == "rope":
        assert model.rope_cos.shape == (c.block_size, c.head_size)
    if c.qk_norm:
        assert block.attn.q_norm.weight.shape == (c.head_size,)


def test_rope_rotates_pairs_by_position_times_frequency():
    # By hand for head size 4, theta 100: frequencies 1 and 1/10; channel pairs (0, 2) and (1, 3).
    cos, sin = rope_tables(4, 3, 100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for pos in range(3):
        out = apply_rope(x, cos[pos], sin[pos])
        for i, f in enumerate((1.0, 0.1)):
            a, b = x[i].item(), x[i + 2].item()
            c, s_ = math.cos(pos * f), math.sin(pos * f)
            assert out[i].item() == pytest.approx(a * c - b * s_, abs=1e-6)
            assert out[i + 2].item() == pytest.approx(b * c + a * s_, abs=1e-6)


def test_rope_scores_depend_only_on_distance():
    torch.manual_seed(0)
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    score = lambda m, n: (apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])).item()  # noqa: E731
    assert score(10, 3) == pytest.approx(score(57, 50), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


@pytest.mark.parametrize("bias, n_kv_head", [(False, 0), (True, 0), (False, 2), (True, 1)])
def test_llama_options_equal_hugging_face_llama(bias, n_kv_head):
    # The rope/rmsnorm/swiglu model is Hugging Face's LlamaForCausalLM with the weights renamed
    # (qkv split into q/k/v, mlp.fc into gate/up): same logits, which is what an export relies on.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = small(**{**LLAMA, "bias": bias}, n_head=4, n_kv_head=n_kv_head, norm_eps=1e-6, rope_theta=500.0,
                tie_embeddings=False)
    ours = GPT(cfg, vocab_size=50).eval()
    with torch.no_grad():  # non-trivial gains and biases, so a mix-up would show
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.1)
    C, H = cfg.n_embd, cfg.mlp_width
    hf_cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=C, intermediate_size=H, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attention_bias=bias, mlp_bias=bias,
        rope_theta=cfg.rope_theta,  # accepted by transformers 4.x and 5.x alike
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = ours.state_dict()
    mapped = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"],
              "lm_head.weight": sd["head.weight"]}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        mapped[h + "input_layernorm.weight"] = sd[b + "norm1.weight"]
        mapped[h + "post_attention_layernorm.weight"] = sd[b + "norm2.weight"]
        for kind in ("weight", "bias") if bias else ("weight",):
            q, k, v = sd[b + f"attn.qkv.{kind}"].split((C, cfg.kv_heads * cfg.head_size, cfg.kv_heads * cfg.head_size))
            gate, up = sd[b + f"mlp.fc.{kind}"].split(H)
            mapped.update({h + f"self_attn.q_proj.{kind}": q, h + f"self_attn.k_proj.{kind}": k,
                           h + f"self_attn.v_proj.{kind}": v, h + f"self_attn.o_proj.{kind}": sd[b + f"attn.proj.{kind}"],
                           h + f"mlp.gate_proj.{kind}": gate, h + f"mlp.up_proj.{kind}": up,
                           h + f"mlp.down_proj.{kind}": sd[b + f"mlp.proj.{kind}"]})
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    idx = torch.randint(50, (2, 16))
    with torch.no_grad():
        theirs = hf(idx).logits
    assert torch.allclose(ours(idx)[0], theirs, atol=1e-5, rtol=1e-4)


def test_architecture_line_says_whether_there_are_biases():
    assert "no biases: model.bias=false" in describe_architecture(small(**LLAMA))
    line = describe_architecture(small(**GPT2, bias=True))
    assert "with biases: model.bias=true" in line and "learned positions" in line and "GELU" in line
    assert "rotary positions (theta 10000)" in describe_architecture(small(**LLAMA))


def test_grouped_query_attention_is_multi_head_attention_with_shared_keys_and_values():
    """A GQA model computes what a multi-head model computes whose key/value heads are copies: head i's
    keys and values are those of kv head i // (n_head / n_kv_head). With the cache, without, and both
    ways of sharing (SDPA's enable_gqa, repeated keys and values)."""
    from tinylm import model as model_module

    torch.manual_seed(0)
    arch = {**LLAMA, "qk_norm": True}
    gqa_cfg = small(**arch, n_head=4, n_kv_head=2)
    gqa = GPT(gqa_cfg, vocab_size=50).eval()
    mha = GPT(small(**arch, n_head=4), vocab_size=50).eval()
    sd = dict(gqa.state_dict())
    C, hs = 32, 8
    for i in range(gqa_cfg.n_layer):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].split((C, 2 * hs, 2 * hs))
        copies = lambda w: w.view(2, hs, C).repeat_interleave(2, dim=0).reshape(C, C)  # noqa: E731
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat((q, copies(k), copies(v)))
    mha.load_state_dict(sd)
    idx = torch.randint(50, (2, 16))
    expected = mha(idx)[0]
    assert torch.allclose(gqa(idx)[0], expected, atol=1e-5)
    cache = gqa.new_cache(batch=2)
    assert cache.k.shape == (2, 2, 2, 16, hs)  # (layers, batch, kv heads, positions, hs): half a full cache
    stepped = torch.cat([gqa(idx[:, :9], cache=cache)[0], *(gqa(idx[:, i : i + 1], cache=cache)[0] for i in range(9, 16))], 1)
    assert torch.allclose(stepped, expected, atol=1e-5)
    flag = model_module.SDPA_GQA
    try:
        model_module.SDPA_GQA = not flag  # the other way of sharing gives the same logits
        assert torch.allclose(gqa(idx)[0], expected, atol=1e-5)
    finally:
        model_module.SDPA_GQA = flag


def test_n_kv_head_must_divide_n_head():
    from tinylm import config as config_
    from tinylm.errors import UserError

    with pytest.raises(UserError, match=r"model.n_head \(4\) must be divisible by model.n_kv_head \(3\)"):
        config_.load(None, {"model.n_kv_head": 3})
    assert config_.load(None, {"model.n_kv_head": 2}).model.kv_heads == 2
    assert config_.load(None).model.kv_heads == 4  # 0: every query head has its own keys and values


def test_zero_init_starts_every_block_as_the_identity_and_predicts_uniformly_yet_learns():
    from tinylm.config import TrainConfig
    from tinylm.optim import make_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, dropout=0.0, tie_embeddings=False, zero_init=True)
    model = GPT(cfg, vocab_size=50)
    x = torch.randint(50, (3, 16))
    h = torch.randn(3, 16, 32)
    rope = (model.rope_cos, model.rope_sin)
    assert all(torch.equal(block(h, rope), h) for block in model.blocks)  # x + attn(...) + mlp(...) = x
    logits, loss = model(x, x)
    assert torch.count_nonzero(logits) == 0 and loss.item() == pytest.approx(math.log(50))
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    for _ in range(2):  # the projections move on the first step, the layers before them from the second
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.count_nonzero(p) > 0 for p in model.parameters())
    assert model(x, x)[1].item() < math.log(50)
    # GPT-2's initialisation, the default, has none of those zeros; a tied head is the embedding, never zero
    tied = GPT(ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, zero_init=True), vocab_size=50)
    assert torch.count_nonzero(tied.head.weight) == tied.head.weight.numel()
    assert all(torch.count_nonzero(p) > 0 for p in GPT(ModelConfig(n_layer=2, n_embd=32, n_head=4), 50).parameters())
