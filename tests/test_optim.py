"""Muon and its AdamW half, against independent references: an SVD and torch.optim.AdamW."""

import copy

import pytest
import torch
from conftest import tiny_config

from tinylm.config import TrainConfig
from tinylm.model import GPT
from tinylm.optim import Muon, make_optimizer, orthogonalize


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_newton_schulz_gives_near_orthogonal_matrix_with_the_same_singular_vectors(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * 3.0
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    o = orthogonalize(g, dtype=torch.float32)
    # o = U f(S) V^T: in G's singular basis it is diagonal, with every entry pulled close to 1.
    d = u.T @ o @ vh.T
    off = d - torch.diag(torch.diagonal(d))
    assert off.abs().max() < 1e-4
    assert torch.diagonal(d).min() > 0.6 and torch.diagonal(d).max() < 1.2
    exact = u @ vh  # the exact orthogonalisation
    assert torch.nn.functional.cosine_similarity(o.flatten(), exact.flatten(), dim=0) > 0.97
    # bfloat16 (the fast path) gives nearly the same matrix; a batch gives each matrix's own result.
    assert torch.allclose(orthogonalize(g).float(), o, atol=0.05)
    batch = orthogonalize(torch.stack([g, 2 * g.flip(0)]), dtype=torch.float32)
    assert torch.allclose(batch[0], o, atol=1e-5) and torch.allclose(batch[1], orthogonalize(2 * g.flip(0), dtype=torch.float32), atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("path", ["functional", "public"])
def test_adamw_groups_step_exactly_like_torch_adamw(fused, path, monkeypatch):
    import tinylm.optim

    assert tinylm.optim._functional_adamw is not None  # this torch has the functional form: the fast path
    if path == "public":  # as on a torch whose functional AdamW is gone or changed
        monkeypatch.setattr(tinylm.optim, "_functional_adamw", None)
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = Muon([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                lr=0.01, betas=(0.9, 0.99), fused=fused)
    kernel = {"fused": True} if fused else {"foreach": True}  # the same kernel as Muon's, so the same bits
    ref = torch.optim.AdamW([{"params": twins[:1], "weight_decay": 0.1}, {"params": twins[1:], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.99), **kernel)
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for opt, ps in ((ours, params), (ref, twins)):
            for group in opt.param_groups:
                group["lr"] = 0.01 * (step + 1)  # as the training loop's schedule does
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        for p, q in zip(params, twins):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq", "step"):  # the state AdamW's state_dict would save
                assert torch.equal(ours.state[p][key], ref.state[q][key])


def test_a_changed_or_missing_functional_adamw_is_not_called(monkeypatch):
    import importlib

    import tinylm.optim

    module = importlib.import_module("torch.optim.adamw")  # (torch.optim deletes its name for it)
    assert tinylm.optim._find_functional_adamw() is module.adamw
    monkeypatch.setattr(module, "adamw", lambda params, grads, *, lr, betas: None)  # other arguments
    assert tinylm.optim._find_functional_adamw() is None
    monkeypatch.delattr(module, "adamw")
    assert tinylm.optim._find_functional_adamw() is None


def test_muon_step_is_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    w = torch.randn(48, 16, requires_grad=True)  # tall: scaled by sqrt(48 / 16)
    start = w.detach().clone()
    opt = Muon([{"params": [w], "muon": True, "lr_scale": 10.0, "weight_decay": 0.5}], lr=0.01, momentum=0.9,
               ns_dtype=torch.float32)
    g1, g2 = torch.randn(48, 16), torch.randn(48, 16)
    w.grad = g1.clone()
    opt.step()
    after_one = start * (1 - 0.01 * 0.5) - 0.01 * 10.0 * 3**0.5 * orthogonalize(g1, dtype=torch.float32)
    assert torch.allclose(w.detach(), after_one, atol=1e-6)
    w.grad = g2.clone()
    opt.step()
    buf = 0.9 * (0.1 * g1) + 0.1 * g2  # momentum buffer; Nesterov looks one step further along it
    step2 = orthogonalize(g2 + 0.9 * (buf - g2), dtype=torch.float32)
    assert torch.allclose(w.detach(), after_one * (1 - 0.005) - 0.1 * 3**0.5 * step2, atol=1e-5)
    u, _, vh = torch.linalg.svd(g2 + 0.9 * (buf - g2), full_matrices=False)
    assert torch.nn.functional.cosine_similarity(step2.flatten(), (u @ vh).flatten(), dim=0) > 0.97


def test_muon_moves_a_stacked_matrix_as_the_separate_matrices_it_stacks():
    # qkv holds the queries', keys' and values' matrices by rows (uneven under grouped-query attention):
    # with its rows given, Muon moves it exactly as it moves the three matrices apart.
    torch.manual_seed(0)
    parts = [torch.randn(16, 16), torch.randn(8, 16), torch.randn(8, 16)]
    grads = [[torch.randn_like(w) for w in parts] for _ in range(3)]
    stacked = torch.cat(parts).requires_grad_()
    apart = [w.clone().requires_grad_() for w in parts]
    kw = dict(lr=0.01, momentum=0.9, ns_dtype=torch.float32)
    one = Muon([{"params": [stacked], "muon": True, "weight_decay": 0.1, "rows": [(16, 8, 8)]}], **kw)
    three = Muon([{"params": apart, "muon": True, "weight_decay": 0.1}], **kw)
    for g in grads:
        stacked.grad, (apart[0].grad, apart[1].grad, apart[2].grad) = torch.cat(g), [x.clone() for x in g]
        one.step()
        three.step()
    assert torch.allclose(stacked.detach(), torch.cat([w.detach() for w in apart]), atol=1e-6)
    # ...which is not how it moves the stacked matrix as one
    whole = torch.cat(parts).requires_grad_()
    plain = Muon([{"params": [whole], "muon": True, "weight_decay": 0.1}], **kw)
    for g in grads:
        whole.grad = torch.cat(g)
        plain.step()
    assert not torch.allclose(whole.detach(), stacked.detach(), atol=1e-3)


def test_make_optimizer_tells_muon_the_rows_of_each_stacked_matrix():
    cfg = tiny_config(__import__("pathlib").Path("."), [], model={"n_embd": 32, "n_head": 4, "n_kv_head": 2}).model
    model = GPT(cfg, vocab_size=20)
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    rows = {names[id(p)]: r for p, r in zip(opt.param_groups[2]["params"], opt.param_groups[2]["rows"])}
    assert rows["blocks.0.attn.qkv.weight"] == (32, 16, 16)  # 4 query heads, 2 key and 2 value heads of 8
    assert rows["blocks.0.mlp.fc.weight"] == (cfg.mlp_width, cfg.mlp_width)  # SwiGLU's gate, up
    assert rows["blocks.0.attn.proj.weight"] is None and rows["blocks.0.mlp.proj.weight"] is None


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.zeros(3, requires_grad=True)], "muon": True}])


def test_make_optimizer_gives_muon_the_block_matrices_only():
    model = GPT(tiny_config(__import__("pathlib").Path("."), [], model={"tie_embeddings": False, "pos": "learned"}).model,
                vocab_size=20)
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.02, weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain, muon = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert decay == {"tok_emb.weight", "pos_emb.weight", "head.weight"}
    assert all(n.endswith(("bias", "norm1.weight", "norm2.weight", "norm_f.weight")) for n in plain)
    assert len(decay) + len(plain) + len(muon) == len(list(model.parameters()))
    assert opt.param_groups[2]["lr_scale"] == pytest.approx(10.0) and opt.param_groups[2]["muon"]


def test_muon_state_round_trips(tmp_path):
    # Saving and loading the optimizer mid-run continues exactly as if it had never stopped.
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, [], model={"bias": True})
    model = GPT(cfg.model, vocab_size=20)
    t = TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.02)
    opt = make_optimizer(model, t, torch.device("cpu"))
    x = torch.randint(20, (4, 32))

    def step(m, o):
        m(x, x)[1].backward()
        o.step()
        o.zero_grad()

    step(model, opt)
    clone = copy.deepcopy(model)
    opt2 = make_optimizer(clone, t, torch.device("cpu"))
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    for _ in range(3):
        step(model, opt)
        step(clone, opt2)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
