"""The model's anatomy (tinylm/anatomy.py): the closed-form parameter count against built models, roles, kinds."""

import pytest
import torch

from tinylm.anatomy import (
    GPT2_SMALL,
    GPT2_VOCAB,
    GPT2_XL,
    KIND_ROLES,
    ParamRow,
    formula_text,
    gpt2_config,
    param_group,
    parameter_formula,
    parameter_table,
    role,
)
from tinylm.config import ModelConfig
from tinylm.model import GPT


@pytest.mark.parametrize("shape", [(1, 1, 8, 4, 11), (2, 2, 32, 16, 50), (3, 4, 64, 40, 300), (5, 3, 48, 7, 1000)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_formula_counts_the_built_model(shape, bias, tied):
    n_layer, n_head, n_embd, block_size, vocab = shape
    cfg = gpt2_config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias, tie_embeddings=tied)
    with torch.device("meta"):
        model = GPT(cfg, vocab)
    assert parameter_formula(cfg, vocab) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", [
    {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},  # the default (Llama)
    {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": True, "qk_norm": True},
    {"pos": "learned", "norm": "rmsnorm", "mlp": "relu2", "bias": True},
    {"pos": "rope", "norm": "layernorm", "mlp": "gelu", "bias": True, "mlp_hidden": 100},
    {"pos": "learned", "norm": "layernorm", "mlp": "swiglu", "bias": False, "qk_norm": True, "mlp_hidden": 96},
    {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2},  # grouped-query attention
    {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "n_kv_head": 1, "qk_norm": True},
    {"pos": "rope", "norm": "layernorm", "mlp": "swiglu", "bias": True, "n_kv_head": 2, "mlp_hidden": 100},
])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_formula_counts_every_architecture(arch, tied):
    cfg = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=40, tie_embeddings=tied, **arch)
    with torch.device("meta"):
        model = GPT(cfg, 300)
    assert parameter_formula(cfg, 300) == sum(p.numel() for p in model.parameters())
    # The text is the same formula: evaluate it with this model's numbers.
    text = formula_text(cfg)[0].removeprefix("P = ").split(", with")[0]
    names = {"V": 300, "T": 40, "C": 64, "L": 3, "H": model.blocks[0].mlp.proj.in_features, "hs": 16,
             "K": (model.blocks[0].attn.qkv.out_features - 64) // 2}
    assert eval(text.replace("^", "**"), {}, names) == parameter_formula(cfg, 300)


def test_parameter_formula_gives_gpt2_small_and_xl():
    assert parameter_formula(GPT2_SMALL, GPT2_VOCAB) == 124_439_808
    assert parameter_formula(GPT2_XL, GPT2_VOCAB) == 1_557_611_200  # the seed's "GPT-2 -> 1.5B parameters"
    with torch.device("meta"):
        xl = GPT(GPT2_XL, GPT2_VOCAB)
    assert sum(p.numel() for p in xl.parameters()) == 1_557_611_200


def test_every_parameter_gets_a_role_and_unknown_names_fall_back_to_their_kind():
    model = GPT(gpt2_config(n_layer=2, n_head=2, n_embd=16, block_size=8), 20)
    roles = {r.name: role(r, tied=True) for r in parameter_table(model)}
    assert all(text not in KIND_ROLES.values() for text in roles.values())  # every name is known
    assert "tied" in roles["tok_emb.weight"] and "query, a key and a value" in roles["blocks.1.attn.qkv.weight"]
    assert roles["blocks.0.mlp.fc.bias"].startswith("MLP in: one b per output")
    assert roles["blocks.0.norm2.weight"].startswith("norm before the MLP: one multiplier")
    assert roles["blocks.1.mlp.fc.weight"] == "MLP in: widens each token's vector from 16 to 64 numbers, before the activation"
    assert role(ParamRow("blocks.0.mlp.gate.weight", (4, 4), 16, "weight")) == KIND_ROLES["weight"]
    assert role(ParamRow("blocks.3.attn.q_norm.weight", (4,), 4, "norm gain")) == KIND_ROLES["norm gain"]
    assert role(ParamRow("blocks.0.mlp.gate.bias", (4,), 4, "bias")) == KIND_ROLES["bias"]


def test_every_tensor_is_filed_under_the_plural_of_its_kind():
    model = GPT(gpt2_config(n_layer=1, n_head=2, n_embd=16, block_size=8, tie_embeddings=False), 20)
    groups = {name: param_group(name, p) for name, p in model.named_parameters()}
    assert groups["tok_emb.weight"] == groups["pos_emb.weight"] == "embeddings"
    assert groups["blocks.0.attn.qkv.weight"] == groups["head.weight"] == "weights"  # an untied head is a matrix
    assert groups["blocks.0.mlp.fc.bias"] == groups["norm_f.bias"] == "biases"
    assert groups["blocks.0.norm1.weight"] == groups["norm_f.weight"] == "norm_gains"
    assert {r.name: r.kind for r in parameter_table(model)}["blocks.0.norm1.weight"] == "norm gain"
