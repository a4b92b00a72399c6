"""The run directory (tinylm/rundir.py): the one comparison of a run's config with its weights', the
metrics file a run writes, and the hints a run prints, with paths a shell reads back."""

import copy
import json
import shlex
import shutil
import signal
from pathlib import Path

import pytest
from conftest import markov_text, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinylm import config as config_
from tinylm import rundir
from tinylm.config import Config
from tinylm.console import Console
from tinylm.errors import UserError
from tinylm.loop import train
from tinylm.start import tokens_per_step


def test_compare_names_the_setting_that_disagrees_with_the_weights():
    trained = Config()
    now = copy.deepcopy(trained)
    now.train.max_steps, now.data.cache_dir = trained.train.max_steps * 2, "elsewhere"
    assert rundir.compare(trained, now, "cannot go on", "undo it") == {
        "data.cache_dir": (trained.data.cache_dir, "elsewhere"),
        "train.max_steps": (trained.train.max_steps, trained.train.max_steps * 2)}
    now.model.n_head = trained.model.n_head * 2
    with pytest.raises(UserError, match=rf"^cannot go on: model.n_head was {trained.model.n_head} and is now "
                                        rf"{now.model.n_head} \(the architecture must not change\); undo it$"):
        rundir.compare(trained, now, "cannot go on", "undo it")
    now = copy.deepcopy(trained)
    now.data.vocab_size += 1
    with pytest.raises(UserError, match=r"data.vocab_size was \d+ and is now \d+ \(the tokenizer must not change\)"):
        rundir.compare(trained, now, "x", "y")


def test_loading_a_run_whose_config_yaml_was_edited(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    edited = config_.load(run / rundir.CONFIG)
    edited.train.max_steps = 1000  # a setting the weights do not depend on: the run loads
    config_.save(edited, run / rundir.CONFIG)
    assert rundir.load(run).config.train.max_steps == 1000
    edited.model.n_embd = 64  # one they do: named, before any weight is loaded
    config_.save(edited, run / rundir.CONFIG)
    with pytest.raises(UserError, match=rf"^{run / 'config.yaml'} does not describe the weights in "
                                        rf"{run / 'checkpoint.pt'}: model.n_embd was 32 and is now 64 "
                                        r"\(the architecture must not change\); undo that edit of config.yaml$"):
        rundir.load(run)


def test_metrics_json_holds_the_last_evaluation_and_how_far_the_run_got(trained_run):
    run = Path(trained_run["run_dir"])
    metrics = json.loads((run / rundir.METRICS).read_text())
    assert metrics == trained_run["result"].metrics == rundir.read_metrics(run)
    cfg = trained_run["cfg"]
    assert metrics["step"] == metrics["eval_step"] == cfg.train.max_steps == 100
    assert metrics["tokens"] == 100 * tokens_per_step(cfg) == 100 * 16 * 32
    assert 0 < metrics["elapsed"] == trained_run["result"].elapsed
    # The same figures TensorBoard logged (float32 there), read back independently.
    events = EventAccumulator(str(run)).Reload()
    val = events.Scalars("val/loss")
    assert val[-1].step == 100 and metrics["val_loss"] == pytest.approx(val[-1].value, rel=1e-6)
    assert metrics["val_bpb"] == pytest.approx(events.Scalars("val/bpb")[-1].value, rel=1e-6)
    assert metrics["train_loss"] == pytest.approx(events.Scalars("train/eval_loss")[-1].value, rel=1e-6)
    assert metrics["best_val_loss"] == pytest.approx(min(e.value for e in val), rel=1e-6)


@pytest.fixture
def odd_root(tmp_path) -> Path:
    """A parent folder whose name a shell would split and whose quote would end a quoted word."""
    return tmp_path / "my runs" / "it's here"


def test_hints_are_commands_a_shell_reads_back(odd_root, tmp_path):
    (tmp_path / "m.txt").write_text(markov_text(3000))
    cfg = tiny_config(tmp_path, [tmp_path / "m.txt"], data={"tokenizer": "char"},
                      train={"max_steps": 4, "eval_interval": 4, "sample_tokens": 0})
    run = odd_root / "a run"
    lines: list[str] = []
    result = train(cfg, run_dir=run, console=Console(lines.append))
    done = lines[-1].splitlines()
    sample = next(line for line in done if "sample:" in line).split("sample:")[1]
    board = next(line for line in done if "tensorboard:" in line).split("tensorboard:")[1]
    assert shlex.split(sample) == ["tinylm", "sample", str(run), "--prompt", "The"]
    assert shlex.split(board) == ["tensorboard", "--logdir", str(odd_root)]
    assert result.metrics["step"] == 4 and json.loads((run / rundir.METRICS).read_text()) == result.metrics

    cfg.train.max_steps = 12
    stopped: list[str] = []

    def stop_at_step_8(line: str) -> None:
        stopped.append(line)
        if line.startswith("step 8:"):
            signal.raise_signal(signal.SIGINT)  # to this thread: handled before the loop goes on

    result = train(cfg, run_dir=run, resume=True, console=Console(stop_at_step_8))
    assert result.interrupted and result.step == 8
    resume = stopped[-1].splitlines()[-1].split("resume with:")[1]
    assert shlex.split(resume) == ["tinylm", "train", "--resume", str(run)]
    assert json.loads((run / rundir.METRICS).read_text()) == result.metrics
    assert result.metrics["step"] == result.metrics["eval_step"] == 8


def test_metrics_that_cannot_be_written_warn_while_training_goes_on_and_fail_the_end(tmp_path):
    (tmp_path / "m.txt").write_text(markov_text(3000))
    cfg = tiny_config(tmp_path, [tmp_path / "m.txt"], data={"tokenizer": "char"},
                      train={"max_steps": 4, "eval_interval": 2, "sample_tokens": 0})
    run = tmp_path / "run"
    (run / rundir.METRICS).mkdir(parents=True)  # where the file should go, a folder: every write fails
    (run / rundir.MARKER).touch()  # a run's folder (tinylm writes into no other)
    lines: list[str] = []
    with pytest.raises(UserError, match=rf"^could not write {run / 'metrics.json'}: Is a directory$"):
        train(cfg, run_dir=run, console=Console(lines.append))
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert warnings == [f"warning: could not write {run / 'metrics.json'}: Is a directory; training goes on "
                        "and tries again at the next evaluation"] * 2  # steps 0 and 2: step 4's is the final error
    assert rundir.load(run).state["step"] == 4  # the checkpoint was saved before
