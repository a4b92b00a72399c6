"""Tracked neurons: single numbers of the model, their gradients and the optimizer's moments, logged to
TensorBoard and read back, against param.grad and optimizer.state seen in the same process."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from tinylm import track
from tinylm.config import ModelConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.model import GPT
from tinylm.optim import make_optimizer


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_logged_gradient_and_moments_equal_the_optimizers_on_that_step(optimizer, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.0), 30)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-2), torch.device("cpu"))
    tracked, note = track.choose("", model, seed=3)
    assert [t.name for t in tracked] == ["blocks.0.mlp.fc.weight", "blocks.0.norm2.weight"]
    assert tracked[0].index[1] == tracked[1].index[0] and "no biases" in note  # the gain of the weight's input
    writer = SummaryWriter(str(tmp_path))
    step = 0
    track.watch(opt, model, writer, tracked, lambda: step, every=2)
    params = dict(model.named_parameters())
    seen: dict[int, dict[str, float]] = {}

    def record_grad(o, args, kwargs):  # registered after watch's: the same gradients, read independently
        seen[step] = {t.tag: float(params[t.name].grad[t.index]) for t in tracked}

    opt.register_step_pre_hook(record_grad)
    for step in (1, 2, 3, 4):
        x = torch.randint(30, (4, 8))
        model(x, x)[1].backward()
        before = {t.tag: float(params[t.name].detach()[t.index]) for t in tracked}
        opt.step()
        for t in tracked:
            seen[step][t.tag + "/update"] = float(params[t.name].detach()[t.index]) - before[t.tag]
            seen[step][t.tag + "/value"] = float(params[t.name].detach()[t.index])
            for key, name in (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("momentum_buffer", "momentum")):
                if key in opt.state[params[t.name]]:
                    seen[step][f"{t.tag}/{name}"] = float(opt.state[params[t.name]][key][t.index])
        opt.zero_grad()
    writer.close()
    acc = EventAccumulator(str(tmp_path)).Reload()
    w, g = tracked[0].tag, tracked[1].tag
    expected_tags = {f"{w}/{k}" for k in ("value", "grad", "update")} | {f"{g}/{k}" for k in ("value", "grad", "update",
                                                                                             "exp_avg", "exp_avg_sq")}
    expected_tags |= {f"{w}/momentum"} if optimizer == "muon" else {f"{w}/exp_avg", f"{w}/exp_avg_sq"}
    assert set(acc.Tags()["scalars"]) == expected_tags
    for tag in expected_tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [2, 4]  # every 2 steps
        for e in events:
            key = tag.rsplit("/", 1)[0] if tag.endswith("/grad") else tag
            assert e.value == pytest.approx(seen[e.step][key], rel=1e-5, abs=1e-9), tag
    assert any(e.value != 0 for e in acc.Scalars(f"{w}/grad"))


def test_a_run_with_biases_tracks_a_weight_and_its_bias(trained_run):
    acc = EventAccumulator(trained_run["run_dir"]).Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("track/")]
    names = {t.split("/")[1] for t in tags}
    assert len(names) == 2 and any(n.startswith("blocks.0.mlp.fc.bias_") for n in names)
    t = trained_run["cfg"].train
    for tag in tags:
        assert [e.step for e in acc.Scalars(tag)] == list(range(t.log_interval, t.max_steps + 1, t.log_interval))


@pytest.mark.parametrize("spec, message", [
    ("blocks.0.mlp.fc.weight", "NAME\\[I,J\\]"),
    ("blocks.0.mlp.fcc.weight[1,2]", "did you mean blocks.0.mlp.fc.weight"),
    ("blocks.0.mlp.fc.weight[1]", "outside that parameter, whose shape is \\[64, 16\\]"),
    ("blocks.0.mlp.fc.weight[1,99]", "outside"),
])
def test_a_bad_track_setting_is_one_line(spec, message):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, mlp="gelu"), 30)
    with pytest.raises(UserError, match=message):
        track.choose(spec, model, 0)
    chosen, _ = track.choose("blocks.0.mlp.fc.weight[1,2], tok_emb.weight[5,0]", model, 0)
    assert [t.label for t in chosen] == ["blocks.0.mlp.fc.weight[1,2]", "tok_emb.weight[5,0]"]
    assert track.choose("none", model, 0) == ([], "")



def test_a_bad_track_setting_leaves_no_run_behind(tmp_path):
    """train.track is checked against the built model before the run's files are written."""
    from conftest import markov_text, tiny_config

    from tinylm.loop import train

    (tmp_path / "m.txt").write_text(markov_text(20_000))
    cfg = tiny_config(tmp_path, [tmp_path / "m.txt"], data={"tokenizer": "char"})
    cfg.train.track = "nope.weight[1,2]"
    run = tmp_path / "run"
    with pytest.raises(UserError, match="no parameter nope.weight"):
        train(cfg, run)
    assert not [p.name for p in run.glob("*")]  # no config.yaml, tokenizer.json, data.json or event file
