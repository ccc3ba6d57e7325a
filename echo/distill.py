"""The training loss, and distillation from the unconverted model, in one place: where the teacher comes from and
the checks it must pass, the losses, and the one call the training loop makes per micro-step (training_loss).

loss = (1 - a - h) * CE + a * T^2 * KL(teacher || student) + h * MSE(hidden)
with a = distill_alpha, h = distill_hidden (an MSE between residual streams, where distill_hidden_at says: EchoAtt's
after each group of layers that share, a source and its consumers, or SwiftKV's one stream entering the last
layer), T = distill_temperature. The teacher is frozen: no gradients, no optimizer state, no dropout; it runs
under inference_mode, its weights in the run's dtype (train.py casts them once, not every step).

The LM head and the CE and KL terms run in chunks of positions (HeadLoss): the (B*T, vocab) fp32 logits of student
and teacher, their softmaxes and their gradient exist a chunk at a time; only the gradient's copy in the matmul
dtype is kept whole, for one weight-gradient matmul at the end.
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
    """T^2 * KL(teacher || student) of the temperature-softened distributions, averaged over positions, from whole
    logits (the reference HeadLoss is tested against). The T^2 keeps the gradient on the scale of the
    cross-entropy's as T changes (Hinton et al., 2015)."""
    V = student_logits.size(-1)
    student = F.log_softmax(student_logits.reshape(-1, V).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, V).float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


CHUNK = 64  # positions per chunk: a 64 x 49,152 fp32 chunk is 12.6 MB (64-256 within noise of each other: RESULTS)


class HeadLoss(torch.autograd.Function):
    """w_ce * CE(targets) + w_kd * T^2 * KL(teacher || student) of the logits features @ weight^T, computed chunk by
    chunk of positions, with the gradients of features and weight computed on the way (the loss is the graph's
    end, so its gradient is known in the forward pass; Liger-Kernel's and torchtune's chunked losses do the same).
    features (N, C) and weight (V, C): the student's normed stream and head; teacher_logits(rows): the teacher's
    logits of those rows (None without a teacher). Returns (loss, CE, KD), 0-dim fp32; only the loss carries a
    gradient. Targets of -1 are ignored by CE (F.cross_entropy's ignore_index=-1; none counted: CE is 0, not NaN);
    KD averages over all rows.
    Each chunk's fp32 logits, softmaxes and their gradient live only while it is computed; the gradient is kept in
    the matmul dtype for one weight-gradient matmul at the end (per chunk, each would add to the whole (V, C) fp32
    gradient: 12x slower at SmolLM2's head in bf16 on a CPU, 671 against 57 ms for 512 positions)."""

    @staticmethod
    def forward(ctx, features, weight, targets, teacher_logits, w_ce, w_kd, temperature):
        device, N = features.device, features.size(0)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        x, w = features.to(dtype), weight.to(dtype)  # the matmuls in the run's dtype, the weight cast once a step
        grad_x = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        grad_logits = torch.empty(N, weight.size(0), dtype=dtype, device=device) if ctx.needs_input_grad[1] else None
        counted = max(int((targets != -1).sum()), 1)  # CE's rows
        ce, kd = torch.zeros((), device=device), torch.zeros((), device=device)
        for rows in torch.arange(N, device=device).split(CHUNK):
            z = (x[rows] @ w.T).float()                                          # (n, V): the chunk's logits
            y, n = targets[rows], torch.arange(len(rows), device=device)
            keep = y != -1
            log_p = z.log_softmax(-1)
            ce -= log_p[n[keep], y[keep]].sum()  # logged even where it has no weight (KD only)
            grad_z = torch.zeros_like(z) if not (w_ce or w_kd) else 0
            if teacher_logits is not None:  # d T^2 KL / dz = T (softmax(z / T) - q), q the teacher's, softened
                log_q = (teacher_logits(rows).float() / temperature).log_softmax(-1)
                log_pt = log_p if temperature == 1 else (z / temperature).log_softmax(-1)
                q = log_q.exp()
                kd += temperature ** 2 * (q * (log_q - log_pt)).sum()
                if w_kd:
                    grad_z = (log_pt.exp() - q).mul_(w_kd * temperature / N)
            if w_ce:  # d CE / dz = softmax(z) - onehot(y), over the counted rows (log_p no longer needed: in place)
                grad_z = grad_z + log_p.exp_().mul_(keep[:, None] * (w_ce / counted))
                grad_z[n[keep], y[keep]] -= w_ce / counted
            grad_z = grad_z.to(dtype)
            if grad_x is not None:
                grad_x[rows] = (grad_z @ w).to(grad_x.dtype)                    # (n, C)
            if grad_logits is not None:
                grad_logits[rows] = grad_z
        ctx.save_for_backward(grad_x, None if grad_logits is None else grad_logits.T @ x)  # (V, C)
        ce, kd = ce / counted, kd / N
        return w_ce * ce + w_kd * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):  # only the loss's gradient flows (the parts are for the log)
        grad_x, grad_w = ctx.saved_tensors  # (autograd casts grad_w to the weight's dtype)
        return (None if grad_x is None else grad_x * grad_loss, None if grad_w is None else grad_w * grad_loss,
                None, None, None, None, None)


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


def head_weight(model):
    """The LM head's weight (V, C) of a model, through DDP's and torch.compile's wrappers."""
    return getattr(model, "module", model).output.weight


def training_loss(model, x, y, cfg, teacher=None, compared=()):
    """The loss one micro-step minimises, and its parts to log ({} without a teacher: plain cross-entropy).
    compared: the layers whose residual streams distill_hidden compares (compared_layers of the student).
    Both models run without their head; HeadLoss applies the heads and the loss in chunks of positions."""
    features, _, hidden = model(x, hidden_at=compared, head=False)                       # (B, T, C)
    a, h, temperature = ((cfg.distill_alpha, cfg.distill_hidden, cfg.distill_temperature) if teacher is not None
                         else (0, 0, 1))
    teacher_logits, teacher_hidden = None, []
    if teacher is not None:
        with torch.inference_mode():  # no autograd state at all: the teacher only gives targets
            teacher_features, _, teacher_hidden = teacher(x, hidden_at=compared, head=False)
            teacher_features, teacher_head = teacher_features.flatten(0, 1), head_weight(teacher)
        teacher_logits = lambda rows: teacher_features[rows] @ teacher_head.T  # noqa: E731  (n, V), in HeadLoss
        teacher_hidden = [t.clone() for t in teacher_hidden]  # out of inference mode: the MSE saves it for backward
    loss, ce, kd = HeadLoss.apply(features.flatten(0, 1), head_weight(model), y.reshape(-1), teacher_logits,
                                  1 - a - h, a, temperature)
    if teacher is None:
        return loss, {}
    parts = {"ce": ce, "kd": kd}
    if cfg.distill_hidden:
        parts["hidden"] = hidden_loss(hidden, teacher_hidden)
        loss = loss + h * parts["hidden"]
    return loss, parts
