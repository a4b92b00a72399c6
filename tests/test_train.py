import math

import pytest
import torch
from conftest import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinylm import rundir
from tinylm.cadence import LOG_POINTS
from tinylm.config import TrainConfig
from tinylm.console import QUIET, Console
from tinylm.errors import UserError
from tinylm.loop import train
from tinylm.model import GPT
from tinylm.optim import learning_rate, make_optimizer

SCALARS = {"train/loss", "val/loss", "val/bpb", "val/ppl", "lr", "grad_norm", "speed/tokens_per_sec", "speed/mfu_percent"}


def test_learns_a_markov_chain_down_to_its_entropy(tmp_path, markov_file):
    # Every letter has two equally likely successors, so the best achievable loss is ln 2 per token
    # (every target has at least its predecessor as context), and no model can go below it.
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"},
                      train={"max_steps": 150, "eval_interval": 150, "eval_batches": 20, "lr": 1e-2, "min_lr": 1e-3})
    result = train(cfg, run_dir=tmp_path / "run", console=QUIET)
    start = EventAccumulator(str(tmp_path / "run")).Reload().Scalars("val/loss")[0].value
    assert abs(start - math.log(9)) < 0.1  # untrained: uniform over 8 letters + end-of-text
    assert math.log(2) - 0.01 < result.metrics["val_loss"] < math.log(2) + 0.05
    # One character is one byte here, so bits per byte is the loss in bits (EOT adds one token per split).
    assert result.metrics["val_bpb"] == pytest.approx(result.metrics["val_loss"] / math.log(2), rel=1e-3)


def test_run_directory_holds_everything(trained_run):
    from pathlib import Path

    run = Path(trained_run["run_dir"])
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "tokenizer.json", "checkpoint.pt", "data.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)


def test_tensorboard_events_hold_the_curves(trained_run):
    acc = EventAccumulator(trained_run["run_dir"]).Reload()
    assert SCALARS <= set(acc.Tags()["scalars"])
    cfg = trained_run["cfg"].train
    # A run of at most LOG_POINTS steps logs its loss at every one (loop.due); longer runs every log_interval.
    assert cfg.max_steps <= LOG_POINTS
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, cfg.max_steps + 1))
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 50, 100]
    val = [e.value for e in acc.Scalars("val/loss")]
    assert val[-1] < val[0] - 1.0
    assert acc.Scalars("parameters/total")[0].value == trained_run["parameters"]
    texts = set(acc.Tags()["tensors"])
    assert {"parameters/text_summary", "samples/text_summary", "config/text_summary"} <= texts
    table = acc.Tensors("parameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"total {trained_run['parameters']:,}" in table


def test_learning_rate_schedule():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    assert learning_rate(0, 0.0, t) == pytest.approx(0.1)  # 1/10 of the way through warmup
    assert learning_rate(9, 0.09, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert learning_rate(50, 0.5, t) == pytest.approx(0.55)  # halfway down the cosine
    assert learning_rate(100, 1.0, t) == pytest.approx(0.1)
    lrs = [learning_rate(s, s / 100, t) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    gpt2 = {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
    model = GPT(tiny_config(__import__("pathlib").Path("."), [], model=gpt2).model, vocab_size=20)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1, optimizer="adamw"), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    decay, plain = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(("bias", "norm1.weight", "norm2.weight", "norm_f.weight")) for p in plain["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"tok_emb.weight", "pos_emb.weight", "blocks.0.attn.qkv.weight"}
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_checkpoint_holds_the_weights_of_the_final_evaluation(trained_run):
    from tinylm.prepare import prepare
    from tinylm.step import evaluate

    loaded, state = rundir.load(trained_run["run_dir"])[2:]
    assert state["step"] == trained_run["step"] == 100
    # The reloaded weights score the run's own final validation loss on the same fixed windows.
    cfg = trained_run["cfg"]
    val = evaluate(loaded, prepare(cfg.data).val, cfg.train, cfg.model.block_size, torch.device("cpu"), None,
                   cfg.train.seed + 1)
    assert val == pytest.approx(trained_run["val_loss"], rel=1e-6)


def test_resume_continues_and_refuses_architecture_change(tmp_path, markov_file):
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"}, train={"max_steps": 20, "sample_tokens": 0})
    train(cfg, run_dir=tmp_path / "run", console=QUIET)
    cfg.train.max_steps = 30  # more steps is a harmless change
    result = train(cfg, run_dir=tmp_path / "run", resume=True, console=QUIET)
    assert result.step == 30
    cfg.model.n_embd = 64
    with pytest.raises(UserError, match="model.n_embd was 32 and is now 64"):
        train(cfg, run_dir=tmp_path / "run", resume=True, console=QUIET)


def test_text_shorter_than_one_window_is_refused(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("just a few words\n" * 3)
    cfg = tiny_config(tmp_path, [p], data={"tokenizer": "char"})
    with pytest.raises(UserError, match="fewer than one training window"):
        train(cfg, run_dir=tmp_path / "run", console=QUIET)


@pytest.mark.parametrize("bias", [False, True])
def test_log_says_plainly_whether_there_are_biases_and_they_train(tmp_path, markov_file, bias):
    lines: list[str] = []
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"}, model={"bias": bias},
                      train={"max_steps": 20, "eval_interval": 20, "sample_tokens": 0, "optimizer": "muon"})
    result = train(cfg, run_dir=tmp_path / "run", console=Console(lines.append))
    log = "\n".join(lines)
    assert ("with biases: model.bias=true" in log) == bias
    assert ("no biases: model.bias=false" in log) == (not bias)
    assert "Muon: " in log and "block matrices" in log
    biases = {n: p for n, p in rundir.load(result.run_dir).model.named_parameters() if n.endswith(".bias")}
    assert bool(biases) == bias
    assert all(p.abs().sum() > 0 for p in biases.values())  # started at zero: the optimizer moved them
