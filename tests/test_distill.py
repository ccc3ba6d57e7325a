"""Distillation from the unconverted model: the loss formula, a teacher that never trains, exact resume."""
import math
import os
import shutil

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from echo.checkpoint import config_from_dict, load_checkpoint
from configurator import configure
from conftest import read_log, run
from model import LLaMA, UsageError
from data.loader import load_dataset
from echo import distill
from echo.distill import (HeadLoss, compared_layers, distill_loss, hidden_loss, load_teacher, teacher_source,
                          training_loss)
from train import TrainConfig, initial_model


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run(data_dir, out, n_layer=4, max_iters=20)
    return str(out)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_loss_formula_against_a_hand_computation(T):
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]])  # (B=1, T=2, V=3)
    teacher = torch.tensor([[[0.5, 2.5, 0.0], [1.0, 1.0, 1.0]]])
    expect = 0.0
    for s_row, t_row in zip(student[0].tolist(), teacher[0].tolist()):
        zs = sum(math.exp(v / T) for v in s_row)
        zt = sum(math.exp(v / T) for v in t_row)
        p = [math.exp(v / T) / zt for v in t_row]
        q = [math.exp(v / T) / zs for v in s_row]
        expect += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expect = T * T * expect / 2  # T^2, mean over the 2 positions
    assert distill_loss(student, teacher, T).item() == pytest.approx(expect, rel=1e-6)
    assert distill_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)


def test_a_student_equal_to_its_teacher_stays_equal(data_dir, teacher_dir, tmp_path):
    """No conversion and distill_alpha=1: the KL starts at exactly 0 and its gradient is 0 but for float
    rounding, so the first update leaves the student on its teacher, while with half cross-entropy it moves
    away. (Later updates drift: Adam normalises the size of any gradient above its eps away, rounding too.)
    Weight decay is off: it would shrink the weights regardless."""
    kd = {}
    for alpha in (1.0, 0.5):
        run(data_dir, tmp_path / str(alpha), init_from=f"ckpt:{teacher_dir}", distill_alpha=alpha, weight_decay=0.0,
            max_iters=3, log_interval=1, eval_interval=3)
        kd[alpha] = [r["kd"] for r in read_log(tmp_path / str(alpha)) if "kd" in r]
    assert kd[1.0][0] == 0.0 and kd[0.5][0] == 0.0  # identical logits before any update
    assert kd[1.0][1] < 1e-6 and kd[0.5][1] > 20 * kd[1.0][1]  # after the first update


def test_the_teacher_is_the_unconverted_model_and_frozen(data_dir, teacher_dir, tmp_path):
    cfg = configure(TrainConfig(), [f"--data_dir={data_dir}", "--dataset=tiny", f"--init_from=ckpt:{teacher_dir}",
                                    "--kv_share=echo:2", "--distill_alpha=0.5", "--block_size=32"])
    meta = load_dataset(cfg)[1]
    model, ckpt, loaded = initial_model(cfg, meta)
    source = teacher_source(cfg, ckpt)
    teacher = load_teacher(cfg, meta, source, loaded, model)
    assert source == f"ckpt:{teacher_dir}" and model.kv_sources == [0, 1, 1, 1] and teacher.kv_sources == [0, 1, 2, 3]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    stored = load_checkpoint(os.path.join(teacher_dir, "ckpt.pt"))["model"]
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in stored.items())


def test_staged_frozen_accumulated_distillation_trains_only_the_student(data_dir, teacher_dir, tmp_path):
    run(data_dir, tmp_path, init_from=f"ckpt:{teacher_dir}", kv_share_target="echo:3", adapt_iters=2,
        trainable="stages:layers", gradient_accumulation_steps=2, distill_alpha=0.5, distill_temperature=2.0, max_iters=8,
        log_interval=1, eval_interval=4)
    logs = [r for r in read_log(tmp_path) if "kd" in r]
    assert len(logs) == 8 and all(r["kd"] > 0 and r["ce"] > 0 for r in logs)
    for r in logs:  # the logged loss is the mixture of its parts
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-5)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    # the last stage trains the whole student: Adam holds state for exactly its parameters, none of the teacher's
    student = LLaMA(config_from_dict(ckpt["model_args"]))
    assert ckpt["stage"] == 3 and len(ckpt["optimizer"]["state"]) == len(list(student.parameters()))
    assert ckpt["teacher_from"] == f"ckpt:{teacher_dir}"
    evals = [r for r in read_log(tmp_path) if "val_loss" in r]
    assert all("kd" not in r for r in evals)  # val loss stays plain cross-entropy


def test_resume_with_distillation_is_exact_and_needs_its_teacher(data_dir, teacher_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(teacher_dir, source)
    conv = dict(init_from=f"ckpt:{source}", kv_share="echo:2", distill_alpha=0.5, dropout=0.1, max_iters=10,
                lr_decay_iters=10, eval_interval=5)
    run(data_dir, tmp_path / "full", **conv)
    run(data_dir, tmp_path / "half", **dict(conv, max_iters=5))
    run(data_dir, tmp_path / "half", init_from="resume", max_iters=10, lr_decay_iters=10, eval_interval=5)
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(tmp_path / "half" / "ckpt.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    losses = lambda d: [(r["iter"], r.get("loss"), r.get("ce"), r.get("kd"), r.get("val_loss"))  # noqa: E731
                        for r in read_log(d)]
    assert losses(tmp_path / "half") == losses(tmp_path / "full")
    shutil.rmtree(source)
    with pytest.raises(UsageError, match=f"cannot load the teacher from ckpt:{source}: no checkpoint at {source}"):
        run(data_dir, tmp_path / "half", init_from="resume", max_iters=15)


def test_the_teacher_is_unchanged_after_training(data_dir, teacher_dir, tmp_path, monkeypatch):
    import train as train_module
    seen, real = [], train_module.load_teacher

    def spy(*args):
        teacher = real(*args)
        seen.append(teacher)
        return teacher
    monkeypatch.setattr(train_module, "load_teacher", spy)
    run(data_dir, tmp_path, init_from=f"ckpt:{teacher_dir}", kv_share="echo:2", distill_alpha=0.5, max_iters=5)
    stored = load_checkpoint(os.path.join(teacher_dir, "ckpt.pt"))["model"]
    teacher = seen[0].state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in stored.items())
    assert not any(p.grad is not None for p in seen[0].parameters())


# ----------------------------------------------------------------------------------------------------
# The chunked head and loss (HeadLoss) against the loss of whole logits

def whole_logits_loss(features, weight, targets, teacher_logits, w_ce, w_kd, temperature):
    """The same loss the plain way: every logit at once, F.cross_entropy and distill_loss."""
    logits = features @ weight.T
    ce = F.cross_entropy(logits, targets, ignore_index=-1)
    kd = distill_loss(logits, teacher_logits, temperature) if teacher_logits is not None else torch.zeros(())
    return w_ce * ce + w_kd * kd, ce, kd


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 70), st.integers(1, 9), st.integers(2, 300), st.integers(1, 33),
       st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.0, 0.3, 1.0]), st.booleans(), st.booleans(),
       st.booleans())
def test_the_chunked_head_loss_equals_the_whole_logits_loss(N, C, V, chunk, T, a, teacher, frozen_head, ignore):
    """Values and gradients, over sizes that do not divide into chunks, with and without a teacher, with ignored
    targets, with the head frozen (no weight gradient asked) or the features (no gradient below the head)."""
    g = torch.Generator().manual_seed(N * 1000 + V)
    features = torch.randn(N, C, generator=g, requires_grad=not (frozen_head and ignore))
    weight = torch.randn(V, C, generator=g, requires_grad=not frozen_head)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore:
        targets[1::3] = -1  # row 0 kept: with none counted, F.cross_entropy gives NaN and HeadLoss 0
    teacher_logits = 3 * torch.randn(N, V, generator=g) if teacher else None
    w_kd = a if teacher else 0.0
    old_chunk, distill.CHUNK = distill.CHUNK, chunk
    try:
        got = HeadLoss.apply(features, weight, targets, (lambda rows: teacher_logits[rows]) if teacher else None,
                             1 - w_kd, w_kd, T)
    finally:
        distill.CHUNK = old_chunk
    want = whole_logits_loss(features, weight, targets, teacher_logits, 1 - w_kd, w_kd, T)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    inputs = [t for t in (features, weight) if t.requires_grad]
    if inputs:
        for x, y in zip(torch.autograd.grad(3 * got[0], inputs), torch.autograd.grad(3 * want[0], inputs)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("alpha,hidden,T,trainable", [(0.0, 0.0, 1.0, "all"), (1.0, 0.0, 1.0, "all"),
                                                      (0.5, 0.25, 2.0, "all"), (0.7, 0.0, 1.0, "attention")])
def test_training_loss_is_the_documented_formula(alpha, hidden, T, trainable):
    """training_loss (both heads and the loss in chunks, the teacher in inference mode) against the module
    docstring's formula computed from whole logits: the loss, its parts and every trained weight's gradient."""
    from echo.conversion import enter_stage
    from model import ModelConfig
    torch.manual_seed(0)
    shape = dict(vocab_size=53, block_size=16, n_layer=4, n_head=6, n_kv_head=2, n_embd=24, intermediate_size=40)
    teacher = LLaMA(ModelConfig(**shape)).eval().requires_grad_(False)
    student = LLaMA(ModelConfig(**shape, kv_share="0,1,1,1"))
    student = enter_stage(student, {"kv_sources": student.kv_sources, "att_sources": student.att_sources,
                                    "trainable": trainable}, "keep")
    cfg = SimpleNamespace(distill_alpha=alpha, distill_hidden=hidden, distill_temperature=T)
    x, y = torch.randint(0, 53, (3, 13)), torch.randint(0, 53, (3, 13))
    y[0, :4] = -1
    compared = compared_layers(student) if hidden else ()
    trained = [p for p in student.parameters() if p.requires_grad]
    loss, parts = training_loss(student, x, y, cfg, teacher, compared)
    got = torch.autograd.grad(loss, trained)
    logits, ce, s_hidden = student(x, y, hidden_at=compared)
    with torch.no_grad():
        t_logits, _, t_hidden = teacher(x, all_logits=True, hidden_at=compared)
    kd = distill_loss(logits, t_logits, T)
    want = (1 - alpha - hidden) * ce + alpha * kd + (hidden * hidden_loss(s_hidden, t_hidden) if hidden else 0)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["ce"], ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["kd"], kd, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, torch.autograd.grad(want, trained)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert len(trained) < len(list(student.parameters())) or trainable == "all"


def test_the_teacher_runs_in_inference_mode_held_in_the_runs_dtype(data_dir, teacher_dir, tmp_path, monkeypatch):
    """In a bf16 run the teacher's weights are bf16, cast once (no autocast cast of them per step), and its
    forward runs under inference_mode (no autograd record at all)."""
    import train as train_module
    seen, real = [], train_module.load_teacher

    def spy(*args):
        teacher = real(*args)
        forward = teacher.forward
        teacher.forward = lambda *a, **kw: seen.append(torch.is_inference_mode_enabled()) or forward(*a, **kw)
        seen.insert(0, teacher)
        return teacher
    monkeypatch.setattr(train_module, "load_teacher", spy)
    run(data_dir, tmp_path, init_from=f"ckpt:{teacher_dir}", kv_share="echo:2", distill_alpha=0.5, max_iters=3,
        dtype="bfloat16", eval_interval=3)
    teacher, modes = seen[0], seen[1:]
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16} and modes == [True] * 3


def test_a_short_conversion_in_bf16_ends_near_fp32(data_dir, teacher_dir, tmp_path):
    """The same 30-iteration distilled conversion in bf16 (autocast, the teacher in bf16, explicit attention, the
    chunked loss in bf16 matmuls) and in fp32: the final val loss within 0.01 nats (the 30 iterations move it by
    0.6; measured 0.0004 apart on a CPU with AVX512-BF16)."""
    conv = dict(init_from=f"ckpt:{teacher_dir}", kv_share="echo:2", distill_alpha=0.5, max_iters=30,
                lr_decay_iters=30, eval_interval=30)
    final = {}
    for dtype in ("float32", "bfloat16"):
        run(data_dir, tmp_path / dtype, dtype=dtype, **conv)
        final[dtype] = read_log(tmp_path / dtype)[-1]["val_loss"]
    first = read_log(tmp_path / "float32")[0]["val_loss"]
    assert abs(final["bfloat16"] - final["float32"]) < 0.01 < 0.5 < first - final["float32"], (first, final)
