"""One training step and one evaluation (tinylm/step.py), against hand-written references on the same
batches, and the loop's decision of when to log, evaluate and save."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import markov_text

from tinylm.batches import batch_starts
from tinylm.cadence import due, finished
from tinylm.config import ModelConfig, TrainConfig
from tinylm.distributed import Dist
from tinylm.guard import BlowUpGuard
from tinylm.model import GPT
from tinylm.optim import make_optimizer
from tinylm.start import LoopState
from tinylm.step import MicroBatch, draw_batches, dropout_seed, evaluate, make_learner, train_step

CPU = torch.device("cpu")
BLOCK = 16


@pytest.fixture
def ids() -> np.ndarray:
    return np.frombuffer(markov_text(4000).encode(), dtype=np.uint8).astype(np.uint16) - ord("a")


def tiny_model(dropout: float = 0.1) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, dropout=dropout), vocab_size=8)


def test_a_step_is_the_hand_written_step(ids):
    """Two micro-batches with dropout, a gradient clipped hard, AdamW: the library's step against the
    same arithmetic written out, with torch.optim.AdamW (unfused) as the reference optimizer."""
    t = TrainConfig(batch_size=4, grad_accum=2, optimizer="adamw", weight_decay=0.1, grad_clip=0.5, seed=7)
    model = tiny_model()
    reference = copy.deepcopy(model)
    learner = make_learner(model, make_optimizer(model, t, CPU), Dist(CPU), None, compile=False)
    batches = draw_batches(ids, t, BLOCK, torch.Generator().manual_seed(3), step=5, dist=Dist(CPU))
    loss, grad_norm = train_step(learner, batches, lr=1e-2, grad_clip=t.grad_clip)

    # By hand: each micro-batch's dropout seeded as the step seeds it, the mean loss's gradient...
    losses = []
    for j, batch in enumerate(batches):
        torch.manual_seed(dropout_seed(7, 5, j))
        _, micro_loss = reference(batch.x, batch.y)
        (micro_loss / 2).backward()
        losses.append(micro_loss.item())
    # ...its norm over every parameter, the clip (torch's rule: scale by clip / (norm + 1e-6) if below 1)...
    norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in reference.parameters()))
    for p in reference.parameters():
        p.grad *= min(1.0, t.grad_clip / (norm + 1e-6))
    # ...and AdamW, decaying matrices and embeddings only.
    matrices = [p for p in reference.parameters() if p.dim() >= 2]
    others = [p for p in reference.parameters() if p.dim() < 2]
    torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                      lr=1e-2, betas=(t.beta1, t.beta2), foreach=False).step()

    assert norm > t.grad_clip  # the clip did something
    assert loss.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert grad_norm.item() == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6), name
        assert ours.grad is None  # cleared for the next step
    assert not torch.equal(model.tok_emb.weight, tiny_model().tok_emb.weight)  # and it did move


def test_two_processes_draw_the_global_batch_alike_and_each_read_its_share(ids):
    t = TrainConfig(batch_size=3, grad_accum=4, seed=1)
    one = draw_batches(ids, t, BLOCK, torch.Generator().manual_seed(9), step=2, dist=Dist(CPU))
    shares = [draw_batches(ids, t, BLOCK, torch.Generator().manual_seed(9), step=2, dist=Dist(CPU, rank=r, world=2))
              for r in (0, 1)]
    assert len(one) == 4 and [len(s) for s in shares] == [2, 2]
    for j, batch in enumerate(one):  # process r runs micro-batches r, r + 2: the same windows, the same dropout
        mine = shares[j % 2][j // 2]
        assert torch.equal(batch.x, mine.x) and torch.equal(batch.y, mine.y) and batch.seed == mine.seed
        assert torch.equal(batch.x[:, 1:], batch.y[:, :-1])  # targets are the inputs shifted by one
    assert len({b.seed for b in one}) == 4


def test_a_step_with_a_non_finite_loss_moves_nothing(ids):
    t = TrainConfig(batch_size=4, optimizer="adamw")
    model = tiny_model(dropout=0.0)
    before = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer(model, t, CPU)
    lines: list[str] = []
    guard = BlowUpGuard(3, CPU, optimizer, lines.append)
    learner = make_learner(model, optimizer, Dist(CPU), None, compile=False)
    batches = draw_batches(ids, t, BLOCK, torch.Generator().manual_seed(0), step=0, dist=Dist(CPU))
    loss, _ = train_step(learner, batches, 1e-2, t.grad_clip, guard, number=1, poison="nan")
    assert math.isnan(loss.item()) and "step 1: the loss or the gradient is not finite" in lines[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not optimizer.state
    train_step(learner, batches, 1e-2, t.grad_clip, guard, number=2)  # a good step after it updates
    assert not torch.equal(before["tok_emb.weight"], model.tok_emb.weight)


def test_evaluation_is_the_mean_loss_over_its_fixed_windows(ids):
    t = TrainConfig(batch_size=5, eval_batches=3)
    model = tiny_model()  # with dropout, which evaluation must switch off
    model.train()
    got = evaluate(model, ids, t, BLOCK, CPU, None, seed=11)
    assert model.training  # handed back as it was
    gen = torch.Generator().manual_seed(11)
    losses = []
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            starts = batch_starts(len(ids), 5, BLOCK, gen)
            windows = torch.tensor(np.stack([ids[s : s + BLOCK + 1] for s in starts]).astype(np.int64))
            logits, _ = model(windows[:, :-1])
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())
    assert got == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert evaluate(model, ids, t, BLOCK, CPU, None, seed=11) == got  # the same windows every time


def test_a_micro_batch_without_a_seed_leaves_torchs_generator_alone():
    model = tiny_model()  # with dropout: its mask comes from torch's generator
    reference = copy.deepcopy(model)
    learner = make_learner(model, torch.optim.SGD(model.parameters(), lr=0.1), Dist(CPU), None, compile=False)
    x = torch.randint(8, (2, BLOCK), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    _, expected = reference(x, x)
    torch.manual_seed(123)
    got, _ = train_step(learner, [MicroBatch(x, x)], lr=0.1, grad_clip=0.0)
    assert got.item() == expected.item()
    torch.manual_seed(123)
    seeded, _ = train_step(learner, [MicroBatch(x, x, seed=5)], lr=0.0, grad_clip=0.0)
    torch.manual_seed(5)
    assert seeded.item() == model(x, x)[1].item() != reference(x, x)[1].item()


@pytest.mark.parametrize("step, log, evaluate_now", [(5, True, False), (10, True, True), (7, False, False), (20, True, True)])
def test_due_logs_evaluates_and_saves_on_their_intervals(step, log, evaluate_now):
    t = TrainConfig(log_interval=5, eval_interval=10)
    when = due(LoopState(torch.Generator(), step=step), t)
    assert (when.log, when.evaluate, when.save) == (log, evaluate_now, evaluate_now)


def test_a_run_is_finished_by_its_steps_or_its_time():
    t = TrainConfig(max_steps=100, max_time=60.0)
    assert not finished(LoopState(torch.Generator(), step=99, elapsed=59.9), t)
    assert finished(LoopState(torch.Generator(), step=100, elapsed=1.0), t)
    assert finished(LoopState(torch.Generator(), step=3, elapsed=60.0), t)
    assert not finished(LoopState(torch.Generator(), step=3, elapsed=1e9), TrainConfig(max_steps=100, max_time=0))
