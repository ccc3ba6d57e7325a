"""Distillation from the unconverted model: the loss formula, a teacher that never trains, exact resume."""
import math
import os
import shutil

import pytest
import torch

from echo.checkpoint import config_from_dict, load_checkpoint
from configurator import configure
from conftest import read_log, run
from model import LLaMA, UsageError
from data.loader import load_dataset
from echo.distill import distill_loss, load_teacher, teacher_source
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
