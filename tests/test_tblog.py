"""What training writes to TensorBoard about weights, biases and embeddings, read back with TensorBoard's own readers."""

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.utils.tensorboard import SummaryWriter

from tinylm.anatomy import gpt2_config
from tinylm.model import GPT
from tinylm.tblog import histogram_tag, quiet_writer_thread_errors, watch_updates
from tinylm.tokenizer import TextTokenizer


def test_histograms_of_weights_and_biases_per_layer_at_every_evaluation(trained_run):
    acc = EventAccumulator(trained_run["run_dir"], size_guidance={"histograms": 0}).Reload()
    tags = set(acc.Tags()["histograms"])
    model = trained_run["model"]
    assert tags == {histogram_tag(n, p) for n, p in model.named_parameters()}
    assert {"weights/blocks.0.attn.qkv", "biases/blocks.0.attn.qkv", "weights/blocks.0.mlp.fc", "biases/blocks.0.mlp.fc",
            "embeddings/tok_emb", "embeddings/pos_emb", "norm_gains/blocks.0.norm1", "biases/blocks.0.norm1"} <= tags
    for name, p in model.named_parameters():
        events = acc.Histograms(histogram_tag(name, p))
        assert [e.step for e in events] == [0, 50, 100]  # the evaluation steps
        last = events[-1].histogram_value  # the final evaluation saw the final parameters
        assert last.num == p.numel() and last.min == pytest.approx(p.min().item()) and last.max == pytest.approx(p.max().item())
        assert last.sum == pytest.approx(p.sum().item(), abs=1e-3)
    biases = acc.Histograms("biases/blocks.0.attn.qkv")
    assert biases[0].histogram_value.min == biases[0].histogram_value.max == 0  # biases start at zero, then learn
    assert biases[-1].histogram_value.max > 0


def test_update_to_weight_ratios_are_logged_at_the_log_interval(trained_run):
    acc = EventAccumulator(trained_run["run_dir"]).Reload()
    t = trained_run["cfg"].train
    for group in ("weights", "biases", "embeddings", "norm_gains"):
        points = acc.Scalars(f"update_ratio/{group}")
        assert [e.step for e in points] == list(range(t.log_interval, t.max_steps + 1, t.log_interval))
        assert all(0 < e.value < 10 for e in points)  # finite and not zero: every kind was nudged


def test_update_ratio_equals_lr_times_gradient_over_weight(tmp_path):
    # With plain SGD the update is exactly -lr * grad, so the ratio of each kind is lr * ||g|| / ||w||.
    torch.manual_seed(0)
    model = GPT(gpt2_config(n_layer=1, n_head=2, n_embd=16, block_size=8), 20)  # with biases and norm gains
    for p in model.parameters():  # biases start at 0: give them a size so that their ratio is defined
        torch.nn.init.normal_(p, std=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = SummaryWriter(str(tmp_path))
    step = 0
    watch_updates(opt, model, writer, lambda: step, every=2)  # steps 1 and 2 are taken; only 2 is measured
    expected = {}
    for step in (1, 2):
        x = torch.randint(20, (2, 8))
        model(x, x)[1].backward()
        for group in ("weights", "biases", "embeddings", "norm_gains"):
            ps = [p for n, p in model.named_parameters() if histogram_tag(n, p).startswith(group + "/")]
            g = torch.sqrt(sum(p.grad.pow(2).sum() for p in ps))
            w = torch.sqrt(sum(p.detach().pow(2).sum() for p in ps))
            expected[group] = (0.05 * g / w).item()
        opt.step()
        opt.zero_grad()
    writer.close()
    acc = EventAccumulator(str(tmp_path)).Reload()
    for group, value in expected.items():
        points = acc.Scalars(f"update_ratio/{group}")
        assert [e.step for e in points] == [2]
        assert points[0].value == pytest.approx(value, rel=1e-4)


def test_token_embeddings_are_in_the_projector_labelled_with_tokens(trained_run):
    run = Path(trained_run["run_dir"])
    config = text_format.Parse((run / "projector_config.pbtxt").read_text(), ProjectorConfig())
    (emb,) = config.embeddings
    assert emb.tensor_name == "tok_emb:00100"
    tok = TextTokenizer.load(run / "tokenizer.json")
    labels = (run / emb.metadata_path).read_text(encoding="utf-8").splitlines()
    assert labels == [repr(tok.decode([i])) for i in range(tok.vocab_size)]
    assert "' cat'" in labels
    vectors = np.loadtxt(run / emb.tensor_path, delimiter="\t")
    weights = trained_run["model"].tok_emb.weight.detach().numpy()
    assert vectors.shape == weights.shape
    np.testing.assert_allclose(vectors, weights, atol=1e-5)  # the trained matrix, rounded to five decimals


def test_only_the_event_writer_threads_write_errors_are_kept_quiet(tmp_path, monkeypatch):
    seen: list = []
    monkeypatch.setattr(threading, "excepthook", seen.append)  # stands for Python's printing hook
    quiet_writer_thread_errors()
    before = set(threading.enumerate())
    writer = SummaryWriter(str(tmp_path))  # starts TensorBoard's real background writer thread
    try:
        (writer_thread,) = set(threading.enumerate()) - before
        other = threading.Thread(target=print)

        def failure(exc: BaseException, thread):
            return threading.ExceptHookArgs((type(exc), exc, None, thread))

        kept_quiet = failure(OSError(28, "No space left on device"), writer_thread)
        passed_on = [failure(ValueError("a bug"), writer_thread), failure(OSError(28, "No space left"), other),
                     failure(OSError(28, "No space left"), None)]
        for args in (kept_quiet, *passed_on):
            threading.excepthook(args)
        assert seen == passed_on
    finally:
        writer.close()


def test_the_custom_scalars_layout_puts_train_and_val_loss_on_one_chart_first(trained_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(trained_run["run_dir"], size_guidance={"tensors": 0}).Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    first = layout.category[0].chart[0]
    assert layout.category[0].title == "loss" and first.title == "training and validation loss"
    assert list(first.multiline.tag) == ["train/loss", "val/loss"]
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss"} <= set(scalars)  # the tags the chart draws exist
    for chart in (c for category in layout.category for c in category.chart):
        assert any(re.fullmatch(tag, s) for tag in chart.multiline.tag for s in scalars), chart.title
