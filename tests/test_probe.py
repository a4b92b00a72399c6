"""The probe: what the model predicts on a fixed text, and where it looks, checked against independent
computations and read back from TensorBoard's event files."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from tinylm import rundir
from tinylm.config import ModelConfig
from tinylm.errors import UserError
from tinylm.model import GPT, attention_maps
from tinylm.probe import (
    MAX_ATTENTION_IMAGES,
    PIXELS,
    attention_selection,
    default_text,
    log_probe,
    make_probe,
    read,
    shown_positions,
    tag_label,
)
from tinylm.tokenizer import train_char


def test_probe_losses_and_candidates_equal_a_separate_softmax_and_are_logged(trained_run):
    run = rundir.load(trained_run["run_dir"])
    probe = make_probe("", run.tokenizer, np.asarray(run.tokenizer.encode("x\nThe cat sat on the mat. The dog sat.\n")),
                       run.config.model.block_size)
    assert probe.text == "The cat sat on the mat. The dog sat."  # the first whole line of 20 characters or more
    assert run.state["probe"]  # the run's own probe, kept with its checkpoint
    probe = make_probe(run.state["probe"], run.tokenizer, np.zeros(1, dtype=np.int64), run.config.model.block_size)
    reading = read(run.model, probe)
    # Independently: the logits of a plain forward pass, softmax in float64.
    with torch.no_grad():
        logits = run.model(torch.tensor([probe.ids]))[0][0].double()
    p = logits.softmax(-1)
    expected_losses = [-math.log(p[i, probe.ids[i + 1]]) for i in range(len(probe.ids) - 1)]
    assert reading.losses == pytest.approx(expected_losses, rel=1e-4, abs=1e-5)
    for pos, cands in reading.candidates.items():
        top = p[pos].argsort(descending=True)[: len(cands)]
        assert [i for i, _ in cands] == top.tolist()
        assert [q for _, q in cands] == pytest.approx(p[pos, top].tolist(), rel=1e-4, abs=1e-6)
    # The last evaluation (step 100) read the saved weights: its scalars are these numbers.
    acc = EventAccumulator(trained_run["run_dir"], size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("probe/loss")] == [0, 50, 100]
    assert acc.Scalars("probe/loss")[-1].value == pytest.approx(np.mean(expected_losses), rel=1e-4)
    first = acc.Scalars("probe/loss")[0].value
    assert first > acc.Scalars("probe/loss")[-1].value  # it learned
    for i, loss in enumerate(expected_losses):
        tag = f"probe/token_loss/{i + 1:02d}_{tag_label(probe.labels[i + 1])}"
        assert acc.Scalars(tag)[-1].value == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert "probe/predictions/text_summary" in acc.Tags()["tensors"]
    images = [t for t in acc.Tags()["images"] if "attention" in t]
    assert len(images) == 2 * 1  # every head of the one layer
    assert [e.step for e in acc.Images(images[0])] == [0, 50, 100]


def test_a_bad_probe_is_one_line_and_none_turns_it_off(trained_run):
    run = rundir.load(trained_run["run_dir"])
    assert make_probe("none", run.tokenizer, np.zeros(1, dtype=np.int64), 32) is None
    with pytest.raises(UserError, match="at least 2 tokens"):
        make_probe("The", run.tokenizer, np.zeros(1, dtype=np.int64), 32)
    assert make_probe("", run.tokenizer, np.asarray(run.tokenizer.encode("x\nThe cat sat on the mat.\n")), 1) is None
    assert default_text(run.tokenizer, np.asarray(run.tokenizer.encode("partial line\nshort\nA long enough line here.\n"))) \
        == "A long enough line here."


def test_the_default_probe_skips_the_end_of_text_token_and_a_char_tokenizer_reads_it():
    tok = train_char(["A first line that is long, of a doc.\nThe second line.\n"])
    val = [*tok.encode("end of a doc"), tok.eot_id, *tok.encode("A first line that is long.\nThe second line.")]
    probe = make_probe("", tok, np.asarray(val), block_size=64)
    assert probe.text == "A first line that is long."[:32] and tok.eot_id not in probe.ids
    with pytest.raises(UserError, match="train.probe: the character tokenizer never saw 'z'"):
        make_probe("zzz", tok, np.asarray(val), 64)


def test_shown_positions_and_attention_selection():
    assert shown_positions(32) == [0, 10, 20, 30]
    assert shown_positions(3) == [0, 1]
    assert attention_selection(2, 4) == [(layer, head) for layer in range(2) for head in range(4)]
    big = attention_selection(24, 16)
    assert len(big) <= MAX_ATTENTION_IMAGES and (0, 0) in big and (23, 15) in big


def rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex numbers: channel pair (i, i + hs/2) of position t turned by t * theta^(-2i/hs)."""
    T, hs = x.shape[-2:]
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2:].double())
    freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    z = z * torch.polar(torch.ones(T, hs // 2, dtype=torch.float64), torch.arange(T)[:, None] * freq)
    return torch.cat((z.real, z.imag), -1)


def reference_attention(model: GPT, block_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Attention probabilities from each block's normed input, by hand: q and k from the qkv matrix, qk
    norm, rotation, each key head repeated for its query heads, softmax of the causal scores (float64)."""
    c: ModelConfig = model.cfg
    out = []
    for block, h in zip(model.blocks, block_inputs):
        T, hs = h.size(1), c.head_size
        w = block.attn.qkv.weight.double()
        b = block.attn.qkv.bias.double() if block.attn.qkv.bias is not None else 0
        qkv = h[0].double() @ w.T + b
        q = qkv[:, : c.n_embd].view(T, c.n_head, hs).transpose(0, 1)
        k = qkv[:, c.n_embd : c.n_embd + c.kv_heads * hs].view(T, c.kv_heads, hs).transpose(0, 1)
        if c.qk_norm:
            q = rms(q, block.attn.q_norm.weight.double(), c.norm_eps)
            k = rms(k, block.attn.k_norm.weight.double(), c.norm_eps)
        if c.pos == "rope":
            q, k = rotate(q, c.rope_theta), rotate(k, c.rope_theta)
        k = torch.stack([k[h_ * c.kv_heads // c.n_head] for h_ in range(c.n_head)])
        scores = q @ k.transpose(1, 2) / math.sqrt(hs)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out.append(scores.softmax(-1).detach())
    return out


ARCHITECTURES = {
    "llama_gqa_qknorm": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=2, qk_norm=True),
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, n_head=2),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_maps_and_images_equal_weights_recomputed_from_q_and_k(arch, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=32, block_size=16, dropout=0.0, **ARCHITECTURES[arch])
    model = GPT(cfg, 50).eval()
    for p in model.parameters():  # give biases and norm gains values of their own, so that they count
        torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=0.3)
    tok = train_char(["abcdefghijklmnopqrstuvwxyz"])
    probe = make_probe("abcdefghijkl", tok, np.zeros(1, dtype=np.int64), cfg.block_size)
    expected = reference_attention(model, capture_inputs(model, probe.ids))
    maps = attention_maps(model, torch.tensor([probe.ids]))
    for got, want in zip(maps, expected):
        assert got[0].double() == pytest.approx(want, abs=1e-5)
    # The images TensorBoard shows are these weights: read back, each pixel is floor(255 * weight).
    writer = SummaryWriter(str(tmp_path))
    log_probe(writer, model, probe, tok, step=7)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert len(acc.Tags()["images"]) == cfg.n_layer * cfg.n_head
    for layer, head in attention_selection(cfg.n_layer, cfg.n_head):
        (event,) = acc.Images(f"probe/attention/layer{layer}/head{head}")
        pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("L"), dtype=np.int64)
        assert pixels.shape == (12 * PIXELS, 12 * PIXELS) and event.step == 7
        want = np.floor(expected[layer][head].numpy() * 255)
        assert np.abs(pixels[::PIXELS, ::PIXELS] - want).max() <= 1


def capture_inputs(model: GPT, ids: list[int]) -> list[torch.Tensor]:
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_weights_times_values_is_what_the_model_computed(arch):
    """The recomputed weights are the ones F.scaled_dot_product_attention applied inside the model."""
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=2, n_embd=32, block_size=16, dropout=0.0, **ARCHITECTURES[arch])
    model = GPT(cfg, 50).eval()
    idx = torch.randint(50, (1, 10))
    inputs, outputs = [], []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    hooks += [b.attn.proj.register_forward_pre_hook(lambda m, a: outputs.append(a[0])) for b in model.blocks]
    with torch.no_grad():
        model(idx)
        maps = attention_maps(model, idx)
        for block, h, y, weights in zip(model.blocks, inputs, outputs, maps):
            _, _, v = block.attn.project(h)
            v = v.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
            mixed = (weights @ v).transpose(1, 2).reshape(1, 10, cfg.n_embd)
            assert mixed == pytest.approx(y, abs=1e-5)
    for h in hooks:
        h.remove()
