"""The run planner (tinylm/plan.py, tinylm/timings.py, start.plan_run): what it chooses from a measurement,
that the user's settings win over it, that a resumed run keeps it, that it can be turned off, and that
its measurement is made once per machine."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import markov_text

from tinylm import config, measure, plan, rundir, timings
from tinylm.cli import main
from tinylm.console import Console
from tinylm.distributed import Dist
from tinylm.loop import train
from tinylm.start import plan_run

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs, and no timing of thread counts (conftest.py)
SHAKESPEARE = 1_003_837  # tiny Shakespeare's training split in characters


def speeds(scale: float = 1.0) -> dict[str, float]:
    """Tokens/s of each ladder shape on an imagined machine: inversely proportional to the parameters."""
    return {s: scale * 4e9 / plan.block_params(*plan.LADDER[s][:2]) for s in plan.LADDER}


def test_the_plan_is_a_function_of_the_measurement():
    a = plan.plan(60, 10**6, SHAKESPEARE, "char", speeds())
    b = plan.plan(60, 10**6, SHAKESPEARE, "char", dict(reversed(list(speeds().items()))))
    assert a == b and a.values["model.n_layer"] in {s[0] for s in plan.LADDER.values()}
    assert [line[:6] for line in a.lines] == ["plan: ", "plan: "]
    assert "budget 60 s" in a.lines[0] and "tokens/s" in a.lines[0]


def test_more_compute_never_plans_a_smaller_model():
    sizes = []
    for budget in (5, 20, 60, 180, 600, 3600):
        chosen = plan.plan(budget, 10**9, SHAKESPEARE, "char", speeds()).values
        sizes.append(plan.block_params(chosen["model.n_layer"], chosen["model.n_embd"]))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_a_small_corpus_seen_many_times_gets_dropout_and_a_large_one_none():
    small = plan.plan(600, 10**9, 20_000, "bpe", speeds())
    large = plan.plan(10, 10**9, 10**9, "bpe", speeds())
    assert small.values["model.dropout"] > 0 and large.values["model.dropout"] == 0
    assert "passes over the corpus" in small.lines[0]


def test_the_law_rewards_fresh_tokens_and_punishes_memorising_a_small_corpus():
    for shape in plan.LADDER:
        losses = [plan.predicted_loss(shape, d, 10**9, "char") for d in (1e5, 1e6, 1e7)]
        assert losses == sorted(losses, reverse=True)
    # 100 passes over 10,000 tokens: the larger model memorises more of them
    assert plan.predicted_loss("G", 1e6, 10**4, "bpe") > plan.predicted_loss("A", 1e6, 10**4, "bpe")
    assert plan.effective_tokens(1e12, 10**5, 8.0) == pytest.approx(10**5 * 8.0)
    assert plan.effective_tokens(10, 10**9, 8.0) == pytest.approx(10, rel=1e-6)


def test_explicit_settings_win_over_the_plan():
    own = plan.plan(60, 10**6, SHAKESPEARE, "char", {"own": 10_000.0}, explicit={"model.n_layer", "model.dropout"},
                    set_tokens_per_step=2048)
    # the shape is theirs as a whole, and so is dropout; the step limit they left to the clock
    assert set(own.values) == {"train.warmup_steps", "train.max_steps"}
    assert "the model's shape is yours" in own.lines[0]
    none = plan.plan(60, 10**6, SHAKESPEARE, "char", speeds(), explicit=set(plan.plan(
        60, 10**6, SHAKESPEARE, "char", speeds()).values))
    assert none.values == {}


def test_with_a_time_limit_the_clock_ends_the_run_unless_the_user_set_max_steps():
    fast = speeds(scale=100.0)  # a machine that trains 3,000 steps of any shape in well under the budget
    corpus = 10**8  # large: the budget buys fewer than MAX_PASSES passes over it
    free = plan.plan(600, 3000, corpus, "char", fast)
    steps = free.values["train.max_steps"]
    per_step = free.values["model.block_size"] * free.values["train.batch_size"]
    passes = float(free.lines[0].split(" passes")[0].rsplit("= ", 1)[1])
    assert steps > 3000 and steps >= 2 * passes * corpus / per_step * 0.9  # twice what the clock allows
    assert plan.round_up(steps) == steps
    capped = plan.plan(600, 3000, corpus, "char", fast, explicit={"train.max_steps"})
    assert "train.max_steps" not in capped.values
    assert float(capped.lines[0].split(" passes")[0].rsplit("= ", 1)[1]) < passes
    assert "train.max_steps" not in plan.plan(0, 3000, corpus, "char", None).values  # by steps: theirs
    assert [plan.round_up(n) for n in (1, 99, 4817, 120_001)] == [1, 99, 4900, 130_000]


def test_by_steps_the_plan_needs_no_measurement_and_shapes_fit_the_corpus():
    by_steps = plan.plan(0, 2000, SHAKESPEARE, "char", None)
    assert by_steps.values["model.n_layer"] >= 1 and "2,000 steps" in by_steps.lines[0]
    tiny = plan.plan(0, 2000, 100, "char", None, max_block=99)
    assert tiny.values["model.block_size"] <= 99


def test_config_files_and_overrides_are_explicit(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  dropout: 0.3\ntrain:\n  lr: 0.001\n")
    cfg = rundir.settings(str(f), {"train.max_steps": 5})
    assert cfg.explicit == {"model.dropout", "train.lr", "train.max_steps"}
    assert "model.n_layer" in rundir.settings("shakespeare_char_cpu", {}).explicit  # a recipe's values count
    assert config.load(None) == config.Config()  # explicitness is no setting: configs still compare equal


def stub_prep(train_tokens: int, val_tokens: int, kind: str = "char", vocab: int = 65) -> SimpleNamespace:
    return SimpleNamespace(meta={"train_tokens": train_tokens, "val_tokens": val_tokens},
                           tokenizer=SimpleNamespace(kind=kind, vocab_size=vocab))


def test_plan_off_keeps_every_default():
    cfg = config.load(None, {"train.plan": "off"})
    lines: list[str] = []
    plan_run(cfg, Dist(CPU), stub_prep(SHAKESPEARE, 100_000), None, Console(write=lines.append), resumed=False)
    expected = config.Config()
    expected.train.plan = "off"
    assert cfg == expected and not [line for line in lines if line.startswith("plan:")]


def test_the_probe_is_skipped_when_cached(monkeypatch):
    cached = {}
    for shape in plan.LADDER:
        m, batch = timings.shape_config(shape, "char")
        measure.store("train_step_seconds", timings.key(m, batch, 65, CPU, None), 1e-9 * plan.block_params(
            m.n_layer, m.n_embd))
        cached[shape] = True
    monkeypatch.setattr(timings, "step_seconds", lambda *a: pytest.fail("timed a shape already measured"))
    lines: list[str] = []
    got = timings.ladder_speeds(60, SHAKESPEARE, "char", 65, CPU, None, lines.append)
    assert got and set(got) <= set(plan.LADDER) and lines == []


@pytest.mark.parametrize("load", [1.0, 2.5, 0.4])
def test_a_new_timing_is_never_compared_with_kept_ones_from_another_load(monkeypatch, load):
    """Kept timings of A and B, then the machine's speed changes by `load` (2.5: a burst of other work, 0.4: a
    quiet moment): the speeds the plan compares must all be this moment's, or all be kept when it did not."""
    quiet = {s: 4e9 / plan.block_params(*plan.LADDER[s][:2]) for s in plan.LADDER}  # tokens/s
    by_size = {plan.LADDER[s][:2]: s for s in plan.LADDER}
    measure.forget("train_step_seconds")
    for shape in "AB":
        m, batch = timings.shape_config(shape, "char")
        measure.store("train_step_seconds", timings.key(m, batch, 65, CPU, None), batch * m.block_size / quiet[shape])
    timed: list[str] = []

    def step_seconds(m, batch, *a):
        timed.append(by_size[m.n_layer, m.n_embd])
        return batch * m.block_size * load / quiet[timed[-1]]

    monkeypatch.setattr(timings, "step_seconds", step_seconds)
    monkeypatch.setattr(timings, "PROBE_SHARE", 1.0)
    lines: list[str] = []
    got = timings.ladder_speeds(600, SHAKESPEARE, "char", 65, CPU, None, lines.append)
    assert set(got) >= {"A", "B", "C"}
    if load == 1.0:  # the same load: B re-timed once, the kept timings used
        assert timed[0] == "B" and "A" not in timed and got["A"] == pytest.approx(quiet["A"])
        assert not any("afresh" in line for line in lines)
    else:
        assert "A" in timed and any("afresh" in line for line in lines)
    assert got == pytest.approx({s: quiet[s] / load for s in got})  # one load throughout


@pytest.mark.parametrize("scale", [0.5, 1.0, 4.0])
def test_the_probe_never_misses_the_shape_the_whole_ladder_would_plan(monkeypatch, scale):
    """Timing stops early along the ladder; it must not stop before the shape that timing every shape would
    choose. The case that found it: 600 s on tiny Shakespeare, where shapes A-C all reach MAX_PASSES, B's
    predicted loss is a hair under C's, and the probe stopped at C, planning B where E was better."""
    measured = {"A": 150e3, "B": 82e3, "C": 39.6e3, "D": 18e3, "E": 12.2e3, "F": 3.5e3, "G": 1.2e3}  # 2 CPU cores
    by_size = {plan.LADDER[s][:2]: s for s in plan.LADDER}
    monkeypatch.setattr(timings, "step_seconds", lambda m, batch, *a: batch * m.block_size / (
        scale * measured[by_size[m.n_layer, m.n_embd]]))
    monkeypatch.setattr(timings, "PROBE_SHARE", 1.0)  # only the stopping rule is under test here
    overhead = plan.Overhead.of(8, 20, 120)
    for kind in ("char", "bpe"):
        for corpus in (100_000, SHAKESPEARE, 10**7):
            for budget in (60, 180, 600, 1800):
                measure.forget("train_step_seconds")
                probed = timings.ladder_speeds(budget, corpus, kind, 65, CPU, None, lambda line: None, overhead)
                every = {s: scale * v for s, v in measured.items()}
                want = plan.choose(budget, plan.UNLIMITED, corpus, kind, every, overhead=overhead,
                                   max_passes=plan.MAX_PASSES)
                got = plan.choose(budget, plan.UNLIMITED, corpus, kind, probed, overhead=overhead,
                                  max_passes=plan.MAX_PASSES)
                assert got[0] == want[0] and got[1] == pytest.approx(want[1]), (kind, corpus, budget)


def test_the_probe_stays_within_its_share_of_the_budget(monkeypatch):
    monkeypatch.setattr(timings, "step_seconds", lambda m, batch, *a: 1e-3 * plan.block_params(m.n_layer, m.n_embd)
                        / plan.block_params(1, 64))
    got = timings.ladder_speeds(20, SHAKESPEARE, "char", 999, CPU, None, lambda line: None)  # a vocab not yet timed
    # 5% of 20 s is 1 s: the guessed cost of 4 more steps of the next shape stops the probe once over it.
    steps = sum(timings.STEPS * timings.step_seconds(*timings.shape_config(s), 0, CPU, None) for s in got)
    assert steps <= timings.PROBE_SHARE * 20 + timings.STEPS * timings.step_seconds(*timings.shape_config(list(got)[-1]),
                                                                              0, CPU, None)


def run_args(tmp_path, **overrides):
    corpus = tmp_path / "markov.txt"
    if not corpus.exists():
        corpus.write_text(markov_text(6000))
    values = {"data.paths": [str(corpus)], "data.tokenizer": "char", "data.cache_dir": str(tmp_path / "cache"),
              "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
              "train.batch_size": 8, "train.max_steps": 4, "train.max_time": 0, "train.eval_batches": 2,
              "train.sample_tokens": 0, "train.device": "cpu", "train.dtype": "float32", **overrides}
    return values


def test_a_run_records_its_plan_and_a_resumed_run_keeps_it(tmp_path):
    lines: list[str] = []
    cfg = config.load(None, run_args(tmp_path))
    train(cfg, run_dir=tmp_path / "run", console=Console(write=lines.append))
    planned = [line for line in lines if line.startswith("plan:")]
    assert len(planned) == 2 and "the model's shape is yours" in planned[0]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["n_embd"] == 32 and saved["train"]["warmup_steps"] == 1  # 4 steps: a tenth, at least 1
    assert saved["model"]["dropout"] == plan.dropout_for(4 * 8 * 32 / 5400)

    lines.clear()
    resumed = rundir.settings(None, {"train.max_steps": 8}, resume_dir=tmp_path / "run")
    train(resumed, run_dir=tmp_path / "run", resume=True, console=Console(write=lines.append))
    assert not [line for line in lines if line.startswith("plan:")]
    again = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert again["train"]["warmup_steps"] == 1 and again["train"]["max_steps"] == 8  # not re-planned for 8 steps


@pytest.mark.parametrize("argv, words", [
    (["--plan", "maybe"], "--plan: invalid choice: 'maybe'"),
    (["--train.plan=maybe"], "config key 'train.plan' must be one of auto, off, got 'maybe'"),
])
def test_bad_plan_settings_are_one_line_errors(argv, words, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err


def test_the_ladder_is_valid_and_smallest_first():
    sizes = [plan.block_params(*shape[:2]) for shape in plan.LADDER.values()]
    assert sizes == sorted(sizes)
    for n_layer, n_embd, n_head, block, batch in plan.LADDER.values():
        config.validate(config.load(None, {"model.n_layer": n_layer, "model.n_embd": n_embd, "model.n_head": n_head,
                                           "model.block_size": block, "train.batch_size": batch}))
        assert plan.block_params(n_layer, n_embd) == sum(
            p.numel() for name, p in __import__("tinylm.model", fromlist=["GPT"]).GPT(
                config.ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head), 2).named_parameters()
            if name.startswith("blocks.") and p.dim() == 2)
    assert math.isfinite(plan.predicted_loss("G", 1e9, 1e9, "bpe"))


def test_the_planner_page_shows_the_ladder_the_code_plans_with():
    # docs/planner.md's table is what a reader compares plan: lines with; it must not drift from LADDER.
    page = (Path(__file__).resolve().parents[1] / "docs" / "planner.md").read_text()
    rows = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in plan.LADDER:
            rows[cells[0]] = (tuple(int(c) for c in cells[1:6]), int(cells[6].replace(",", "")))
    assert rows == {s: (shape, plan.block_params(*shape[:2])) for s, shape in plan.LADDER.items()}


def test_the_fit_recovers_the_law_from_a_table_the_law_wrote():
    from benchmarks import fit

    rows = []
    for kind, corpus in (("bpe", 1_000_000), ("bpe", 60_000), ("bpe", 300_000)):
        for shape in "ABCDE":
            for tokens in (2e5, 5e5, 1e6):
                n_layer, n_embd, *_ = plan.LADDER[shape]
                rows.append({"tokenizer": kind, "corpus_tokens": corpus, "n_layer": n_layer, "n_embd": n_embd,
                             "tokens": tokens, "val_loss": plan.predicted_loss(shape, tokens, corpus, kind)})
    alpha, beta, repeats, gamma, delta, coef, err = fit.fit(rows)
    e, a, law_alpha, b, law_beta, law_repeats = plan.LAWS["bpe"]
    assert (alpha, beta, repeats, gamma, delta) == (law_alpha, law_beta, law_repeats, plan.GAMMA, plan.DELTA)
    assert err < 1e-6 and coef[-1] == pytest.approx(plan.MEMORISING, rel=1e-4)
    assert coef[3:6] == pytest.approx((e, a, b), rel=1e-4)
    # One kind's own law, the memorising term held: the characters' constants from runs the law wrote.
    char = [{**r, "tokenizer": "char", "val_loss": plan.predicted_loss(s, r["tokens"], r["corpus_tokens"], "char")}
            for r, s in zip(rows, [s for _ in range(3) for s in "ABCDE" for _ in range(3)])]
    alpha, beta, repeats, coef, err = fit.fit_kind(char)
    assert (alpha, beta, repeats) == plan.LAWS["char"][2:3] + plan.LAWS["char"][4:6] and err < 1e-6
    assert tuple(coef) == pytest.approx(plan.LAWS["char"][0:2] + plan.LAWS["char"][3:4], rel=1e-4)


def test_the_characters_law_plans_more_model_for_more_time_on_this_machines_speeds():
    # The speeds a quiet 2-core AVX-512 BF16 CPU measured (tokens/s): the plan grows from the 2-layer model at
    # 60 s to the 3-layer at 180 s and past it at 600 s, where the sweep's law kept the 2-layer model.
    measured = {"A": 102_400, "B": 58_516, "C": 29_383, "D": 16_746, "E": 8_715, "F": 2_560, "G": 910}
    overhead = plan.Overhead.of(8, 20, 120)
    widths = [plan.LADDER[plan.choose(budget, 10**12, SHAKESPEARE, "char", measured, overhead=overhead)[0]][1]
              for budget in (60, 180, 600)]
    assert widths[0] == 96 and widths[1] == 128 and widths[2] > 128


def test_attention_precision_follows_the_measurement(monkeypatch):
    from tinylm.model import GPT

    m = config.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0)
    model, x = GPT(m, 50), torch.randint(0, 50, (2, 16))
    for faster, fp32 in (("bfloat16", False), ("float32", True)):
        monkeypatch.setattr(timings, "attention_seconds", lambda shape, dtype: 1.0 if str(dtype).endswith(faster) else 2.0)
        monkeypatch.setattr(measure, "cached", lambda name, params, fn: (fn(), False))
        lines: list[str] = []
        timings.choose_attention(model, m, 2, CPU, torch.bfloat16, lines.append)
        assert all(b.attn.cpu_attention_fp32 == fp32 for b in model.blocks)
        assert lines[0].startswith(f"attention in {'float32' if fp32 else 'bfloat16'}")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x, x)[1])


def test_the_thread_count_follows_the_measurement(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(timings, "step_seconds", lambda *a: 0.1 * torch.get_num_threads() ** 2)  # busy: 1 is faster
        monkeypatch.setattr(measure, "cached", lambda name, params, fn: (fn(), False))
        lines: list[str] = []
        assert timings.choose_threads(CPU, None, lines.append) == 1 and torch.get_num_threads() == 1
        assert lines[0].startswith("threads: 1 of 2")
        torch.set_num_threads(2)  # quiet: one thread about as fast as two (within THREADS_MARGIN) keeps both
        monkeypatch.setattr(timings, "step_seconds", lambda *a: 0.1 / torch.get_num_threads() ** 0.1)
        lines.clear()
        assert timings.choose_threads(CPU, None, lines.append) == 2 and torch.get_num_threads() == 2
        assert lines == ["threads: 2 of 2 (1: 100 ms, 2: 93 ms a step, measured now)"]
    finally:
        torch.set_num_threads(threads)


def test_a_run_far_from_its_kept_timing_drops_this_machines_timings(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "measurements"))
    m, batch = timings.shape_config("B")
    shape_key = timings.key(m, batch, 65, CPU, None)
    measure.store("train_step_seconds", shape_key, 0.01)  # 204,800 tokens/s
    measure.store("threads", {"candidates": [1, 2], "dtype": "None"}, {"1": 0.1, "2": 0.05})
    lines: list[str] = []
    assert not timings.check_kept_speed(m, batch, 65, CPU, None, 150_000.0, lines.append)  # within 1.5x
    assert measure.lookup("train_step_seconds", shape_key) == 0.01 and lines == []
    assert timings.check_kept_speed(m, batch, 65, CPU, None, 50_000.0, lines.append)
    assert measure.lookup("train_step_seconds", shape_key) is None
    assert measure.lookup("threads", {"candidates": [1, 2], "dtype": "None"}) is None
    assert "50,000 tokens/s" in lines[0] and "204,800" in lines[0] and "busier" in lines[0]


def test_a_real_run_checks_the_timing_kept_for_its_shape(tmp_path, monkeypatch):
    from conftest import tiny_config

    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "measurements"))
    (tmp_path / "m.txt").write_text(markov_text(4000))
    cfg = tiny_config(tmp_path, [tmp_path / "m.txt"], data={"tokenizer": "char"}, train={"sample_tokens": 0})
    kept = [timings.key(cfg.model, cfg.train.batch_size, 2**k, CPU, None) for k in range(1, 9)]  # any vocabulary
    for k in kept:
        measure.store("train_step_seconds", k, 1e-7)  # billions of tokens/s: no CPU trains this fast
    lines: list[str] = []
    train(cfg, run_dir=tmp_path / "run", console=Console(write=lines.append))
    assert all(measure.lookup("train_step_seconds", k) is None for k in kept)
    assert [line for line in lines if line.startswith("speed: this run trained at")]


def test_character_models_of_the_swept_shapes_get_their_embedding_learning_rate_and_bpe_keeps_the_default():
    char = plan.plan(60, 10**6, SHAKESPEARE, "char", speeds())
    chosen = (char.values["model.n_layer"], char.values["model.n_embd"])
    shape = next(s for s, v in plan.LADDER.items() if v[:2] == chosen)
    assert shape in plan.LR_SHAPES
    assert char.values["train.lr"] == plan.EMBEDDING_LR["char"] and "train.min_lr" not in char.values
    assert "train.lr" not in plan.plan(60, 10**6, SHAKESPEARE, "bpe", speeds()).values
    for mine in ({"train.lr"}, {"train.min_lr"}):  # either of them set: the learning rate is the user's
        assert "train.lr" not in plan.plan(60, 10**6, SHAKESPEARE, "char", speeds(), explicit=mine).values
    big = plan.plan(3600, 10**9, 10**9, "char", speeds(scale=1e4))  # a GPU-fast machine: F or G, not swept
    assert big.values["model.n_embd"] >= 384 and "train.lr" not in big.values


def test_a_timed_run_is_planned_for_at_most_max_passes_and_then_ends_before_its_time():
    # The built-in corpus (100,877 BPE tokens) in 180 s on a fast machine: 4.72 at 16 passes, 5.01 at 29.
    fast = plan.plan(180, 3000, 100_877, "bpe", speeds(scale=10.0))
    values = fast.values
    per_step = values["model.block_size"] * values["train.batch_size"]
    assert values["train.max_steps"] * per_step == pytest.approx(plan.MAX_PASSES * 100_877, rel=0.01)
    assert "more would only memorise it" in fast.lines[0] and f"step {values['train.max_steps']:,}" in fast.lines[0]
    # Where the budget buys fewer passes, or the user set max_steps, nothing is capped.
    slow = plan.plan(180, 3000, 10**8, "bpe", speeds())
    assert "memorise" not in slow.lines[0]
    mine = plan.plan(180, 50_000, 100_877, "bpe", speeds(scale=10.0), explicit={"train.max_steps"})
    assert "train.max_steps" not in mine.values and "memorise" not in mine.lines[0]
    # Planned for fewer passes than MAX_PASSES, the step limit (twice the expected steps, for a machine
    # faster than its timing) still stops the run at MAX_PASSES.
    for scale in (0.5, 0.7, 0.9, 1.0, 1.5, 3.0):
        values = plan.plan(180, 3000, 100_877, "bpe", speeds(scale=scale)).values
        per_step = values["model.block_size"] * values["train.batch_size"]
        assert values["train.max_steps"] * per_step <= plan.MAX_PASSES * 100_877 + per_step


def test_a_planned_shape_comes_with_qk_norm_and_for_characters_an_untied_head_unless_the_family_is_the_users(tmp_path):
    char = plan.plan(60, 10**6, SHAKESPEARE, "char", speeds()).values
    assert char["model.qk_norm"] is True and char["model.tie_embeddings"] is False
    bpe = plan.plan(60, 10**6, SHAKESPEARE, "bpe", speeds()).values
    assert bpe["model.qk_norm"] is True and "model.tie_embeddings" not in bpe  # a BPE head stays tied
    mine = plan.plan(60, 10**6, SHAKESPEARE, "char", speeds(), explicit={"model.qk_norm"}).values
    assert "model.qk_norm" not in mine and mine["model.tie_embeddings"] is False
    for family in plan.FAMILY_KEYS:  # a GPT-2 recipe (any of pos, norm, mlp, bias set) keeps its architecture
        gpt2 = plan.plan(60, 10**6, SHAKESPEARE, "char", speeds(), explicit={family}).values
        assert not {"model.qk_norm", "model.tie_embeddings"} & set(gpt2) and "model.n_layer" in gpt2
    # The probe times each shape as the plan builds it for the tokenizer, and keeps it apart from others.
    m, batch = timings.shape_config("B", "char")
    assert m.qk_norm and not m.tie_embeddings and (m.n_layer, m.n_embd) == plan.LADDER["B"][:2]
    plain, _ = timings.shape_config("B")
    assert timings.key(m, batch, 65, CPU, None) != timings.key(plain, batch, 65, CPU, None)
    # A real planned run builds the planned model and records it, so a resumed run rebuilds the same.
    corpus = tmp_path / "m.txt"
    corpus.write_text(markov_text(6000))
    assert main(["train", "--data", str(corpus), "--data.tokenizer=char", "--data.cache_dir", str(tmp_path / "cache"),
                 "--train.max_steps=6", "--train.max_time=0", "--train.sample_tokens=0", "--train.device=cpu",
                 "--run_dir", str(tmp_path / "run")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert saved["qk_norm"] is True and saved["tie_embeddings"] is False
    _, _, model, _ = rundir.load(tmp_path / "run")
    assert model.blocks[0].attn.q_norm is not None and model.head.weight is not model.tok_emb.weight


def test_dropout_comes_with_many_passes_or_a_model_large_for_its_corpus():
    e = plan.block_params(*plan.LADDER["E"][:2])
    assert plan.dropout_for(6.7, e, SHAKESPEARE) == 0.1  # the 600 s plan: 1.5437 without, 1.4611 with
    assert plan.dropout_for(5.2, plan.block_params(*plan.LADDER["C"][:2]), SHAKESPEARE) == 0.0  # the 180 s plan
    assert plan.dropout_for(12.0) == 0.1 and plan.dropout_for(3.0) == 0.0  # by passes alone, as before
    assert plan.dropout_for(6.7, e, 100 * SHAKESPEARE) == 0.0  # the same model on a corpus 100x larger


def test_a_run_starts_alike_whether_its_machine_was_timed_now_or_before(tmp_path, monkeypatch):
    # The timings run a model of their own, seeded; a run seeded before them once started from other
    # weights on a machine's first run (timed now) than on later ones (timings kept).
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "measurements"))
    cfg = config.load(None, run_args(tmp_path, **{"train.max_time": 60, "train.max_steps": 2}))
    def step_timings() -> dict:
        return {k: v for k, v in json.loads(measure.cache_path().read_text()).items()
                if v["name"] == "train_step_seconds"}

    train(cfg, run_dir=tmp_path / "timed", console=Console(write=lambda line: None))
    kept = step_timings()
    assert len(kept) == 1  # the first run timed its shape...
    train(cfg, run_dir=tmp_path / "kept", console=Console(write=lambda line: None))
    assert step_timings() == kept  # ...the second did not
    first, second = (rundir.load(tmp_path / name)[2] for name in ("timed", "kept"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
