"""Arithmetic checked exactly, with the defaults that would hide it switched off: the distribution sampling
draws from, gradient accumulation (Adam's update barely depends on the gradient's scale, so the gradient
itself is compared, read from the optimizer's first moment), two processes against one, the LR schedule."""
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

from echo.checkpoint import load_checkpoint
from conftest import ROOT, run, tiny_args
from echo.generate import sample_logits, sampling_probs
from train import TrainConfig, get_lr


def hand_probs(logits, temperature, top_k, top_p, vocab_limit):
    """The sampling distribution, step by step in plain Python: padding cut, temperature, top-k, top-p."""
    z = [v / temperature for v in logits[:vocab_limit]]
    if top_k:
        kth = sorted(z, reverse=True)[min(top_k, len(z)) - 1]
        z = [v if v >= kth else -math.inf for v in z]
    if top_p is not None and top_p < 1.0:
        total = sum(math.exp(v) for v in z)
        before, keep = 0.0, set()
        for n, i in enumerate(sorted(range(len(z)), key=lambda i: -z[i])):
            if n == 0 or before < top_p:  # a token stays while the ones before it cover less than top_p
                keep.add(i)
            before += math.exp(z[i]) / total
        z = [v if i in keep else -math.inf for i, v in enumerate(z)]
    total = sum(math.exp(v) for v in z)
    return [math.exp(v) / total for v in z]


LOGITS = [[2.0, 0.5, -1.0, 1.5, 0.0, 3.0, -0.5], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]]


@pytest.mark.parametrize("temperature,top_k,top_p,vocab_limit", list(itertools.product(
    [0.5, 1.0, 2.5], [None, 1, 3, 7], [None, 0.3, 0.75, 0.9], [None, 5])))
def test_sampling_distribution_equals_a_hand_computation(temperature, top_k, top_p, vocab_limit):
    got = sampling_probs(torch.tensor(LOGITS), temperature, top_k, top_p, vocab_limit)
    for row, probs in zip(LOGITS, got.tolist()):
        assert probs == pytest.approx(hand_probs(row, temperature, top_k, top_p, vocab_limit), abs=1e-6)


@pytest.mark.parametrize("candidates", [512, 3])
def test_draws_follow_the_distribution(candidates, monkeypatch):
    """Draws against sampling_probs, for a peaked and a flat row in one batch; with 3 candidates the flat row's
    nucleus reaches past them (drawn the slow way) while the peaked row's does not."""
    import echo.generate as generate_module
    monkeypatch.setattr(generate_module, "NUCLEUS_CANDIDATES", candidates)
    logits = torch.tensor(LOGITS)
    for kw in (dict(temperature=2.0, top_p=0.75), dict(temperature=0.7, top_k=3, top_p=0.9, vocab_limit=5),
               dict(temperature=1.0, top_p=0.5)):
        torch.manual_seed(0)
        draws = sample_logits(logits.repeat_interleave(20_000, 0), **kw).view(2, -1)
        for row, probs in zip(draws, sampling_probs(logits, **kw).double()):
            freq = torch.bincount(row, minlength=logits.size(1)).double() / len(row)
            assert (freq[:len(probs)] - probs).abs().max() < 0.012 and freq[len(probs):].sum() == 0, kw
    assert sample_logits(logits[:1], temperature=0, vocab_limit=5).item() == 0  # greedy within the real vocabulary


def first_moment(out_dir):
    """The gradient of the one step taken, as Adam stored it: exp_avg = (1 - beta1) * grad."""
    state = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["optimizer"]["state"]
    return [state[k]["exp_avg"] / 0.1 for k in sorted(state)]


@pytest.mark.parametrize("grad_clip", [0.0, 0.05], ids=["no-clip", "clip-binds"])
def test_accumulation_gives_the_gradient_of_one_larger_batch(data_dir, tmp_path, grad_clip):
    kw = dict(max_iters=1, eval_interval=1, grad_clip=grad_clip, beta1=0.9, weight_decay=0.0)
    run(data_dir, tmp_path / "acc", batch_size=4, gradient_accumulation_steps=3, **kw)
    run(data_dir, tmp_path / "big", batch_size=12, gradient_accumulation_steps=1, **kw)
    a, b = first_moment(tmp_path / "acc"), first_moment(tmp_path / "big")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    norm = torch.sqrt(sum((g ** 2).sum() for g in a)).item()
    if grad_clip:
        assert norm == pytest.approx(grad_clip, rel=1e-4)  # clipping did act, on the averaged gradient
    else:
        assert norm > 0.1  # unclipped: far above what the clip would have allowed


def test_two_processes_equal_one_process_on_the_same_global_batch(data_dir, tmp_path):
    kw = dict(max_iters=3, eval_interval=3, batch_size=4, gradient_accumulation_steps=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *tiny_args(data_dir, tmp_path / "ddp", **kw)],
                       capture_output=True, text=True, cwd=ROOT, timeout=1200, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    run(data_dir, tmp_path / "one", **kw)
    a, b = load_checkpoint(tmp_path / "ddp" / "ckpt.pt"), load_checkpoint(tmp_path / "one" / "ckpt.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-5)


def test_learning_rate_schedule_at_its_boundaries():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1 / 11) and get_lr(9, cfg) == pytest.approx(10 / 11)
    assert get_lr(10, cfg) == 1.0                                   # warmup ends at the peak
    assert get_lr(60, cfg) == pytest.approx(0.55)                   # half way: (peak + min) / 2
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(111, cfg) == 0.1 and get_lr(10_000, cfg) == 0.1
    lrs = [get_lr(i, cfg) for i in range(10, 112)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))                 # never rises after the warmup
    assert get_lr(5, TrainConfig(learning_rate=0.3, decay_lr=False, warmup_iters=10)) == 0.3
    no_warmup = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=0, lr_decay_iters=0)
    assert get_lr(0, no_warmup) == 1.0 and get_lr(1, no_warmup) == 0.0
