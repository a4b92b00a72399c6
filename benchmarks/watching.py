"""What watching the model learn costs: the probe, the tracked numbers and the kept snapshots, at the
default cadence, as a share of the training time of a default run.

    python -m benchmarks.watching [--corpus FILE] [--shape default|tiny|6L] [--seconds S]

Each piece is timed on its own (tinylm.measure.best_time: the fastest of repeated calls, since a shared
machine only ever slows a call down) on the default recipe's model, trained a few steps first so that
the optimizer has its moments:

    probe      tinylm.probe.log_probe: a forward pass over the probe, its attention maps, the scalars,
               the text and the images written to a real event file; once per evaluation
    track      tinylm.track's optimizer hooks with the default tracked numbers; once per log_interval steps
    snapshot   tinylm.snapshots.keep on a real checkpoint of this model; once per evaluation

A default run (train.max_time seconds, or train.max_steps steps if those come first) takes
steps = min(max_steps, max_time / step time) steps, evaluates at step 0, every eval_interval steps and
at train.evals marks, and logs every log_interval steps: the table multiplies each cost by its count
and divides by the run's training time (steps x step time). The target is under 3%.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from benchmarks.common import SHAPES, Trainer, data, recipe, shape_overrides
from tinylm import checkpoint, probe, rundir, snapshots, track
from tinylm import config as config_
from tinylm.measure import best_time, machine


def costs(tr: Trainer, out: Path, seconds: float) -> dict[str, float]:
    """Seconds per call of a training step, the probe, the tracking hooks and a snapshot."""
    t = tr.cfg.train
    for _ in range(3):  # moments in the optimizer, gradients that are not all zero
        tr.step(t.lr)
    step = best_time(lambda: tr.step(t.lr), seconds)
    tok, model = tr.prep.tokenizer, tr.model
    writer = SummaryWriter(str(out / "events"))
    p = probe.make_probe("", tok, tr.prep.val, tr.cfg.model.block_size)
    probe_s = best_time(lambda: probe.log_probe(writer, model, p, tok, 0), seconds)
    tracked, _ = track.choose("", model, t.seed)
    pre, post = track.hooks(model, writer, tracked, lambda: 0, 1)
    batch = tr.prep.train[: tr.cfg.model.block_size + 1].astype("int64")
    x = torch.from_numpy(batch).to(tr.device)[None]
    model(x[:, :-1], x[:, 1:])[1].backward()  # gradients for the hooks to read, as before a step
    track_s = best_time(lambda: (pre(tr.optimizer, (), {}), post(tr.optimizer, (), {})), seconds)
    tr.optimizer.zero_grad(set_to_none=True)
    run = out / "run"
    run.mkdir()
    checkpoint.save({"model": model.state_dict(), "optimizer": tr.optimizer.state_dict()}, run / rundir.CHECKPOINT)
    n = iter(range(1, 10**9))
    snap_s = best_time(lambda: snapshots.keep(run, next(n), 1.0, t.keep_snapshots), seconds)
    writer.close()
    return {"step": step, "probe": probe_s, "track": track_s, "snapshot": snap_s,
            "checkpoint_mb": (run / rundir.CHECKPOINT).stat().st_size / 1e6}


def table(c: dict[str, float], cfg) -> str:
    t = cfg.train
    steps = min(t.max_steps, int(t.max_time / c["step"])) if t.max_time else t.max_steps
    evals = 1 + steps // t.eval_interval + t.evals
    logs = steps // t.log_interval
    training = steps * c["step"]
    rows = [("probe (text, scalars, attention images)", c["probe"], evals),
            ("tracked numbers (hooks, one host sync)", c["track"], logs),
            ("snapshot (hard link, index.json)", c["snapshot"], evals)]
    lines = [f"a default run: {steps:,} steps of {c['step'] * 1e3:.1f} ms = {training:.0f} s of training, "
             f"{evals} evaluations, {logs} logged steps; a checkpoint is {c['checkpoint_mb']:.1f} MB",
             "", f"{'what':<42} {'ms per call':>11} {'calls':>6} {'seconds':>8} {'of training':>12}"]
    total = 0.0
    for name, cost, calls in rows:
        total += cost * calls
        lines.append(f"{name:<42} {cost * 1e3:>11.2f} {calls:>6} {cost * calls:>8.2f} {cost * calls / training:>12.2%}")
    lines.append(f"{'all of it':<42} {'':>11} {'':>6} {total:>8.2f} {total / training:>12.2%}   (target < 3%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=None,
                   help="a text file, read as characters; default: the default run's data (the built-in corpus, BPE)")
    p.add_argument("--shape", choices=("default", *SHAPES), default="default",
                   help="the model: the default recipe's, or one of benchmarks/common.py's shapes")
    p.add_argument("--seconds", type=float, default=2.0, help="time each piece for about this long")
    p.add_argument("--cache_dir", default="data/cache")
    args = p.parse_args(argv)
    overrides = {"train.device": "cpu"} if not torch.cuda.is_available() else {}
    if args.shape != "default":
        overrides.update(shape_overrides(args.shape))
    if args.corpus:
        cfg = recipe("tuned", args.corpus, args.cache_dir, overrides)
    else:
        cfg = config_.load(None, {**overrides, "data.cache_dir": args.cache_dir})
    with tempfile.TemporaryDirectory() as tmp:
        c = costs(Trainer(cfg, data(cfg)), Path(tmp), args.seconds)
    m = cfg.model
    print(f"watching the model learn: its cost at the default cadence ({m.n_layer} layers, {m.n_embd} wide, "
          f"context {m.block_size}, batch {cfg.train.batch_size})")
    for key, value in machine().items():
        print(f"  {key}: {value}")
    print()
    print(table(c, cfg))


if __name__ == "__main__":
    main()
