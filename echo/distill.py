"""Distillation from the unconverted model, in one place: where the teacher comes from and the checks it must
pass, the losses, and the one call the training loop makes per micro-step (training_loss).

loss = (1 - a - h) * CE + a * T^2 * KL(teacher || student) + h * MSE(hidden)
with a = distill_alpha, h = distill_hidden (an MSE between residual streams, where distill_hidden_at says: EchoAtt's
after each group of layers that share, a source and its consumers, or SwiftKV's one stream entering the last
layer), T = distill_temperature. The teacher is frozen: no gradients, no optimizer state, no dropout.
"""
import copy

import torch
import torch.nn.functional as F

from model import UsageError
from echo.pretrained import IMPORTS, load_pretrained


def distilling(cfg):
    return cfg.distill_alpha > 0 or cfg.distill_hidden > 0


def check_distill_settings(cfg):
    for key in ("distill_alpha", "distill_hidden"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise UsageError(f"{key}={getattr(cfg, key)}: expected 0 <= {key} <= 1 (0 = off)")
    if cfg.distill_alpha + cfg.distill_hidden > 1:
        raise UsageError(f"distill_alpha + distill_hidden = {cfg.distill_alpha + cfg.distill_hidden}: the two "
                         f"weights and the cross-entropy's (1 - both) must not exceed 1")
    if cfg.distill_hidden_at not in HIDDEN_AT:
        raise UsageError(f"distill_hidden_at={cfg.distill_hidden_at!r}: expected one of {', '.join(HIDDEN_AT)}")
    if not (cfg.distill_temperature > 0 and cfg.distill_temperature < float("inf")):
        raise UsageError(f"distill_temperature={cfg.distill_temperature}: expected a number > 0")
    if cfg.distill_from and not cfg.distill_from.startswith(("ckpt:", *IMPORTS)):
        raise UsageError(f"distill_from={cfg.distill_from!r}: expected '' (the model as loaded), ckpt:DIR, hf:DIR "
                         f"or gguf:FILE")
    if distilling(cfg) and cfg.init_from == "scratch" and not cfg.distill_from:
        raise UsageError("distill_alpha or distill_hidden > 0 needs a teacher: a run from scratch has none, so "
                         "give distill_from=ckpt:DIR, hf:DIR or gguf:FILE")


def teacher_source(cfg, ckpt):
    """Where this run's teacher comes from: a resumed run's recorded source, else distill_from, else the
    model the run starts from (init_from), as loaded."""
    if cfg.init_from == "resume":
        return ckpt.get("teacher_from")
    return cfg.distill_from or (cfg.init_from if cfg.init_from != "scratch" else None)


def load_teacher(cfg, meta, source, loaded, student):
    """The frozen teacher, or None when not distilling. loaded: the model as it was loaded, before any
    conversion (the default teacher, copied so that training the student leaves it alone)."""
    if not distilling(cfg):
        return None
    if source == cfg.init_from and loaded is not None:  # the model as loaded; a copy if the student is that model
        teacher = copy.deepcopy(loaded) if loaded is student else loaded
    else:
        try:
            teacher = load_pretrained(source, meta, cfg.dataset)
        except UsageError as e:
            raise UsageError(f"cannot load the teacher from {source}: {e}") from None
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UsageError(f"the teacher {source} has a vocabulary of {teacher.config.vocab_size}, "
                         f"the student {student.config.vocab_size}: they must be the same")
    if teacher.config.block_size < cfg.block_size:
        raise UsageError(f"block_size={cfg.block_size} exceeds the teacher's context {teacher.config.block_size}")
    shape = lambda c: (c.n_layer, c.n_embd)  # noqa: E731
    if cfg.distill_hidden > 0 and shape(teacher.config) != shape(student.config):
        raise UsageError(f"distill_hidden compares residual streams layer by layer, but the teacher {source} "
                         f"has (n_layer, n_embd) = {shape(teacher.config)}, the student {shape(student.config)}")
    return teacher.eval().requires_grad_(False)


def distill_loss(student_logits, teacher_logits, temperature):
    """T^2 * KL(teacher || student) of the temperature-softened distributions, averaged over positions.
    The T^2 keeps the gradient on the scale of the cross-entropy's as T changes (Hinton et al., 2015)."""
    V = student_logits.size(-1)
    student = F.log_softmax(student_logits.reshape(-1, V).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, V).float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


HIDDEN_AT = ("groups", "before_last")


def compared_layers(model, at="groups"):
    """The layers after which distill_hidden compares the student's residual stream with the teacher's: 'groups',
    the last layer of each group (a source and its consumers, the layers that read its K/V or attention), as
    EchoAtt does; 'before_last', the layer before the last (its output is what the last layer reads), as
    SwiftKV does (ArcticTraining's hidden_loss_layer=-2 of Hugging Face's hidden_states)."""
    if at == "before_last":
        return (len(model.layers) - 2,)
    last = {}
    for i, sources in enumerate(zip(model.kv_sources, model.att_sources)):
        for src in sources:
            if src != i:
                last[src] = i
    return tuple(sorted(set(last.values())))


def hidden_loss(student_hidden, teacher_hidden):
    """Mean over the compared layers of the MSE between residual streams (0 before any layer shares)."""
    if not student_hidden:
        return torch.zeros(())
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student_hidden, teacher_hidden)) / len(student_hidden)


def training_loss(model, x, y, cfg, teacher=None, compared=()):
    """The loss one micro-step minimises, and its parts to log ({} without a teacher: plain cross-entropy).
    compared: the layers whose residual streams distill_hidden compares (compared_layers of the student)."""
    logits, ce, hidden = model(x, y, hidden_at=compared)
    if teacher is None:
        return ce, {}
    with torch.no_grad():
        teacher_logits, _, teacher_hidden = teacher(x, all_logits=True, hidden_at=compared)
    parts = {"ce": ce, "kd": distill_loss(logits, teacher_logits, cfg.distill_temperature)}
    if cfg.distill_hidden:
        parts["hidden"] = hidden_loss(hidden, teacher_hidden)
    a, h = cfg.distill_alpha, cfg.distill_hidden
    return (1 - a - h) * ce + a * parts["kd"] + h * parts.get("hidden", 0.0), parts
