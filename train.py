"""Train a LLaMA, plain or with cross-layer KV sharing, on a prepared dataset.

    python train.py config/train_shakespeare_char_cpu.py --max_iters=500 --kv_share=echo:2
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char.py --gradient_accumulation_steps=2

Settings: the defaults in TrainConfig below, then a config file, then --key=value overrides.
"""
import contextlib
import copy
import json
import math
import os
import sys
import time
import types
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import IMPORTS, import_pretrained, load_checkpoint, model_from_checkpoint, read_json, save_checkpoint
from configurator import COMPILE, DEVICE, DTYPE, check_device, configure, precision, run_main
from model import (MLP, Attention, LLaMA, ModelConfig, UsageError, convert_sharing, projection_owner,
                   resolve_sharing, training_flops_per_token)
from perf import device_peak


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    always_save_checkpoint: bool = True   # save at every eval, not only when val loss improves
    init_from: str = "scratch"            # 'scratch', 'resume' (out_dir/ckpt.pt), 'ckpt:DIR', 'hf:DIR', 'gguf:FILE'
    seed: int = 1337
    # data: {data_dir}/{dataset}/train.bin, val.bin, meta.json from data/*/prepare.py
    dataset: str = "shakespeare_char"
    data_dir: str = "data"
    batch_size: int = 12                  # micro-batch per process
    block_size: int = 64
    gradient_accumulation_steps: int = 1  # total over all processes; the loss is averaged over micro-steps
    # model (see ModelConfig)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    kv_share: str = "none"                # with ckpt:/hf:, the loaded model is converted to this spec
    att_share: str = "none"               # EchoAtt's attention sharing, the same grammar; converted likewise
    # converting to sharing (see README): one shot via kv_share/att_share, or layer-wise via the *_target ones
    kv_init: str = "keep"                 # a producer's K/V start as its own ('keep') or its readers' mean ('mean')
    kv_share_target: str = ""             # e.g. 'echo:4': convert its consumers top-down, 1, then 2, 4, ... in all
    att_share_target: str = ""            # the same for attention sharing (both may be given)
    adapt_iters: int = 0                  # iterations per stage; after the stages, full fine-tuning to max_iters
    adapt_freeze: bool = False            # during the stages, train only the converted layers (+ producers' K/V)
    # distillation (see README): loss = (1 - a - h) * CE + a * T^2 * KL(teacher || student) + h * MSE(hidden)
    distill_alpha: float = 0.0            # a; 0 = off
    distill_hidden: float = 0.0           # h: EchoAtt's term, MSE of the residual streams after each shared block
    distill_temperature: float = 1.0      # T: both distributions are softened by it
    distill_from: str = ""                # teacher: '' = the model as loaded, before conversion; or ckpt:, hf:, gguf:
    # AdamW, linear warmup then cosine decay to min_lr
    learning_rate: float = 1e-3
    max_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0                # 0 disables clipping
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    min_lr: float = 1e-4
    # system: the defaults pick the GPU, bf16 and torch.compile when there is a GPU
    device: str = DEVICE
    dtype: str = DTYPE
    compile: bool = COMPILE
    peak_flops: float = -1.0              # FLOP/s for MFU; -1 = datasheet (listed GPU, bf16) or measured here; 0 = off


def check_settings(cfg):
    """Every training setting in its range: one line naming the first that is not."""
    at_least = {"batch_size": 1, "block_size": 1, "eval_interval": 1, "eval_iters": 1, "log_interval": 1,
                "gradient_accumulation_steps": 1, "max_iters": 0, "warmup_iters": 0, "lr_decay_iters": 0,
                "adapt_iters": 0}
    for key, low in at_least.items():
        if getattr(cfg, key) < low:
            raise UsageError(f"{key}={getattr(cfg, key)}: must be at least {low}")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{key}={value}: expected a finite number >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise UsageError(f"{key}={getattr(cfg, key)}: expected 0 <= {key} < 1")
    if not (cfg.peak_flops == -1 or cfg.peak_flops >= 0) or not math.isfinite(cfg.peak_flops):
        raise UsageError(f"peak_flops={cfg.peak_flops}: expected FLOP/s > 0, 0 (no MFU) or -1 (automatic)")
    if cfg.kv_init not in ("keep", "mean"):
        raise UsageError(f"kv_init={cfg.kv_init!r}: expected 'keep' or 'mean'")
    if not (cfg.init_from in ("scratch", "resume") or cfg.init_from.startswith(("ckpt:", *IMPORTS))):
        raise UsageError(f"init_from={cfg.init_from!r}: expected scratch, resume, ckpt:DIR, hf:DIR or gguf:FILE")
    for key in ("kv_share_target", "att_share_target"):
        if getattr(cfg, key) and cfg.init_from == "scratch":
            raise UsageError(f"{key} converts a trained model: use it with init_from=ckpt:DIR, hf:DIR or gguf:FILE")
    for key in ("distill_alpha", "distill_hidden"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise UsageError(f"{key}={getattr(cfg, key)}: expected 0 <= {key} <= 1 (0 = off)")
    if cfg.distill_alpha + cfg.distill_hidden > 1:
        raise UsageError(f"distill_alpha + distill_hidden = {cfg.distill_alpha + cfg.distill_hidden}: the two "
                         f"weights and the cross-entropy's (1 - both) must not exceed 1")
    if not (cfg.distill_temperature > 0 and math.isfinite(cfg.distill_temperature)):
        raise UsageError(f"distill_temperature={cfg.distill_temperature}: expected a number > 0")
    if cfg.distill_from and not cfg.distill_from.startswith(("ckpt:", *IMPORTS)):
        raise UsageError(f"distill_from={cfg.distill_from!r}: expected '' (the model as loaded), ckpt:DIR, hf:DIR "
                         f"or gguf:FILE")
    if distilling(cfg) and cfg.init_from == "scratch" and not cfg.distill_from:
        raise UsageError("distill_alpha or distill_hidden > 0 needs a teacher: a run from scratch has none, so "
                         "give distill_from=ckpt:DIR, hf:DIR or gguf:FILE")
    check_device(cfg.device)
    precision(cfg.device, cfg.dtype)


def distilling(cfg):
    return cfg.distill_alpha > 0 or cfg.distill_hidden > 0


def set_dropout(model, p):
    """Set the dropout probability of every layer (a setting, not a weight: checkpoints carry their own)."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, (Attention, MLP)):
            m.dropout = p
    return model


def model_config(cfg, vocab_size):
    names = {f.name for f in fields(ModelConfig)} - {"vocab_size"}
    return ModelConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in names})


# ----------------------------------------------------------------------------------------------------
# Data

def load_dataset(cfg):
    """The train/val token memmaps and the dataset's meta (tokenizer, vocab size, id dtype), checked."""
    folder = os.path.join(cfg.data_dir, cfg.dataset)
    meta_path = os.path.join(folder, "meta.json")
    redo = f"re-run python data/{cfg.dataset}/prepare.py"
    if not os.path.isfile(meta_path):
        raise UsageError(f"dataset '{cfg.dataset}' is not prepared: run python data/{cfg.dataset}/prepare.py")
    meta = read_json(meta_path, "the dataset's meta")
    if not isinstance(meta, dict) or not {"tokenizer", "vocab_size", "dtype"} <= set(meta):
        raise UsageError(f"{meta_path} lacks tokenizer, vocab_size or dtype: {redo}")
    if meta["dtype"] not in ("uint16", "uint32") or type(meta["vocab_size"]) is not int or meta["vocab_size"] < 1:
        raise UsageError(f"{meta_path}: dtype {meta['dtype']!r} / vocab_size {meta['vocab_size']!r} are not "
                         f"uint16|uint32 / a positive whole number: {redo}")
    data = {}
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.isfile(path):
            raise UsageError(f"{path} is missing: {redo}")
        size, item = os.path.getsize(path), np.dtype(meta["dtype"]).itemsize
        if size % item:
            raise UsageError(f"{path} has {size} bytes, not a whole number of {meta['dtype']} ids: "
                             f"truncated or damaged; {redo}")
        if size // item <= cfg.block_size:
            raise UsageError(f"{path} has {size // item} tokens, fewer than block_size+1 = {cfg.block_size + 1}")
        data[split] = np.memmap(path, dtype=meta["dtype"], mode="r")
        top = int(data[split].max())  # one pass over the file: an id the model has no row for is an error
        if top >= meta["vocab_size"]:
            raise UsageError(f"{path} holds token id {top}, outside the vocabulary of {meta['vocab_size']}: {redo}")
    return data, meta


def get_batch(data, batch_size, block_size, generator, rows=slice(None)):
    """batch_size random windows: inputs x and next-token targets y, each (batch_size, block_size); with
    rows, only those rows of the draw (a DDP rank's share of the global batch)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)[rows].tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    return x, y


def batch_generator(seed, iter_num):
    """Each iteration draws its global batch from its own seed, so a resumed run sees exactly the batches it
    would have, and N processes see the same rows as one process accumulating N times as many micro-steps."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iter_num) * 1009)


def rng_state(device):
    """Every RNG training draws from (dropout): the CPU generator, and the GPU's when training on one."""
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------------
# Optimisation helpers

def make_optimizer(model, cfg):
    """AdamW (the fused kernel: ~8% faster steps even on CPU); weight decay on 2-D weights only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def get_lr(it, cfg):
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, data, cfg, autocast):
    """Mean loss over eval_iters batches per split; the same batches every time, so evals compare."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(1337 + (split == "val"))  # not cfg.seed: runs of any seed compare
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data[split], cfg.batch_size, cfg.block_size, g)
            with autocast:
                losses.append(model(x.to(cfg.device), y.to(cfg.device))[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------
# Where the model comes from, and the layer-wise conversion schedule

RUN_SETTINGS = ("kv_share_target", "att_share_target", "adapt_iters", "adapt_freeze", "kv_init",  # schedule and
                "distill_alpha", "distill_hidden", "distill_temperature", "distill_from")  # teacher: kept on resume


def same_tokens(a, b):
    return all(a.get(k) == b.get(k) for k in ("tokenizer", "vocab_size", "itos", "tokenizer_json"))


def resume_checkpoint(cfg, meta):
    """The checkpoint to resume, checked; the run's schedule settings are restored from it (a different
    value given explicitly is an error, since it would silently change a half-finished conversion)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, require=("optimizer", "iter_num", "best_val_loss", "config", "meta"))
    if not (type(ckpt["iter_num"]) is int and ckpt["iter_num"] >= 0 and isinstance(ckpt["optimizer"], dict)
            and isinstance(ckpt["config"], dict) and isinstance(ckpt["meta"], dict)
            and isinstance(ckpt["best_val_loss"], float)):
        raise UsageError(f"checkpoint {path}: iter_num, optimizer, config, meta or best_val_loss has the wrong type")
    states = ckpt.get("rng_states") or ([{"cpu": ckpt["rng_state"]}] if "rng_state" in ckpt else None)
    if not (isinstance(states, list) and all(isinstance(s, dict) and isinstance(s.get("cpu"), torch.Tensor)
                                             for s in states)):
        raise UsageError(f"checkpoint {path} lacks a valid RNG state: it cannot be resumed exactly "
                         f"(fine-tune from it instead with init_from=ckpt:DIR)")
    ckpt["rng_states"] = states
    if not same_tokens(ckpt["meta"], meta):
        raise UsageError(f"{path} was trained on other tokens than dataset '{cfg.dataset}'")
    for key in RUN_SETTINGS:
        saved = ckpt["config"].get(key, getattr(TrainConfig, key))
        if key in cfg.explicit and getattr(cfg, key) != saved:
            raise UsageError(f"{key}={getattr(cfg, key)!r}, but the run being resumed has {key}={saved!r}: a "
                             f"resumed run keeps its conversion schedule (start a new out_dir to change it)")
        setattr(cfg, key, saved)
    return ckpt


def load_pretrained(source, cfg, meta):
    """The model that ckpt:DIR, hf:DIR or gguf:FILE names, checked to read the dataset's tokens."""
    if source.startswith("ckpt:"):
        path = os.path.join(source[5:], "ckpt.pt")
        ckpt = load_checkpoint(path, require=("meta",))
        if not isinstance(ckpt["meta"], dict) or not same_tokens(ckpt["meta"], meta):
            raise UsageError(f"{source} was trained on other tokens than dataset '{cfg.dataset}'")
        return model_from_checkpoint(ckpt, path)
    model = import_pretrained(source)
    if meta["tokenizer"] != "hf" or meta["vocab_size"] > model.config.vocab_size:
        raise UsageError(f"dataset '{cfg.dataset}' is not tokenized for {source}: prepare it with --tokenizer={source}")
    return model


def initial_model(cfg, meta):
    """(model, checkpoint to resume or None, teacher or None, where the teacher comes from or None), as
    init_from and distill_* say. The default teacher is the model as loaded, before any conversion."""
    teacher = teacher_from = None
    if cfg.init_from == "scratch":
        vocab = meta["vocab_size"]
        if vocab >= 6400:  # pad a large vocabulary to a multiple of 64 (faster matmuls; under 1% more rows)
            vocab = 64 * math.ceil(vocab / 64)
        model, ckpt, teacher_from = LLaMA(model_config(cfg, vocab)), None, cfg.distill_from or None
    elif cfg.init_from == "resume":
        ckpt = resume_checkpoint(cfg, meta)
        model = model_from_checkpoint(ckpt, os.path.join(cfg.out_dir, "ckpt.pt"))
        if "dropout" in cfg.explicit:
            set_dropout(model, cfg.dropout)
        teacher_from = ckpt.get("teacher_from")
    else:
        model, ckpt = load_pretrained(cfg.init_from, cfg, meta), None
        set_dropout(model, cfg.dropout)  # fine-tuning: dropout is this run's setting, not the source's
        teacher_from = cfg.distill_from or cfg.init_from
        if distilling(cfg) and teacher_from == cfg.init_from:
            teacher = copy.deepcopy(model)  # the model as loaded, before the conversion below
        # one-shot conversion, if asked for (a spec not given keeps the sharing the model has)
        specs = {k: getattr(cfg, k) if k in cfg.explicit else getattr(model.config, k)
                 for k in ("kv_share", "att_share")}
        if not (cfg.kv_share_target or cfg.att_share_target):
            wanted = resolve_sharing(types.SimpleNamespace(**specs, n_layer=model.config.n_layer))
            if (model.kv_sources, model.att_sources) != wanted:
                model = convert_sharing(model, **specs, kv_init=cfg.kv_init)
    if not distilling(cfg):
        return model, ckpt, None, None
    if teacher is None:
        try:
            teacher = load_pretrained(teacher_from, cfg, meta)
        except UsageError as e:
            raise UsageError(f"cannot load the teacher from {teacher_from}: {e}") from None
    if teacher.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"the teacher {teacher_from} has a vocabulary of {teacher.config.vocab_size}, "
                         f"the student {model.config.vocab_size}: they must be the same")
    if teacher.config.block_size < cfg.block_size:
        raise UsageError(f"block_size={cfg.block_size} exceeds the teacher's context {teacher.config.block_size}")
    shape = lambda c: (c.n_layer, c.n_embd)  # noqa: E731
    if cfg.distill_hidden > 0 and shape(teacher.config) != shape(model.config):
        raise UsageError(f"distill_hidden compares residual streams layer by layer, but the teacher {teacher_from} "
                         f"has (n_layer, n_embd) = {shape(teacher.config)}, the student {shape(model.config)}")
    teacher.eval().requires_grad_(False)  # frozen: no gradients, no optimizer state, no dropout
    return model, ckpt, teacher, teacher_from


def distill_loss(student_logits, teacher_logits, temperature):
    """T^2 * KL(teacher || student) of the temperature-softened distributions, averaged over positions.
    The T^2 keeps the gradient on the scale of the cross-entropy's as T changes (Hinton et al., 2015)."""
    V = student_logits.size(-1)
    student = F.log_softmax(student_logits.reshape(-1, V).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, V).float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def block_outputs(model):
    """The last layer of each shared block (a source and the layers that read its K/V or attention): where
    distill_hidden compares the student's residual stream with the teacher's, as EchoAtt does."""
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


def adaptation_stages(start, kv_target="", att_target="", freeze=False):
    """The layer-wise conversion schedule as plain data: a list of stages, each a dict with the model's
    kv_sources and att_sources during the stage and whether only the converted layers train ("freeze").

    The target's consumers (layers that read another layer's K/V or attention) are converted from the top
    layer down: the first stage converts 1 of them, the next 2, then 4, ... (cumulative counts: each stage
    keeps the conversions before it), the last adaptation stage all of them. The final entry is the full
    fine-tuning at the target (never frozen). start: the model's {"kv_sources", "att_sources"}; a target
    not given keeps the start's sharing of that kind. A layer not yet converted keeps its sources from
    start, except that what it computes in the target it computes from the first stage on (in a model that
    already shares, a target source may be a consumer, and a converted layer must read a layer that computes)."""
    if not (kv_target or att_target):  # nothing to convert: one stage, the model as it is
        return [{"kv_sources": start["kv_sources"], "att_sources": start["att_sources"], "freeze": False}]
    n = len(start["kv_sources"])
    spec = lambda target, key: target or ",".join(map(str, start[key]))  # noqa: E731
    kv, att = resolve_sharing(types.SimpleNamespace(kv_share=spec(kv_target, "kv_sources"),
                                                    att_share=spec(att_target, "att_sources"), n_layer=n))
    target = {"kv_sources": kv, "att_sources": att}
    consumers = [i for i in reversed(range(n)) if kv[i] != i or att[i] != i]
    counts = [2 ** k for k in range(len(consumers).bit_length()) if 2 ** k < len(consumers)] + [len(consumers)]

    def stage(converted, frozen):
        return {key: [target[key][i] if i in converted else i if target[key][i] == i else start[key][i]
                      for i in range(n)] for key in target} | {"freeze": frozen}

    return [stage(consumers[:c], freeze) for c in counts if c] + [stage(consumers, False)]


def legacy_stages(stages, n_layer, freeze):
    """A checkpoint written before attention sharing stored only the adaptation stages' kv_sources."""
    if stages and isinstance(stages[0], dict):
        return stages
    final = {"kv_sources": stages[-1], "att_sources": list(range(n_layer)), "freeze": False}
    return [dict(final, kv_sources=s, freeze=freeze) for s in stages] + [final]


def enter_stage(model, stage, cfg):
    """Convert the model to the stage's sources (if it is not there yet) and set what trains: all of it,
    or when the stage freezes, only the converted layers and the projections they now read."""
    if (model.kv_sources, model.att_sources) != (stage["kv_sources"], stage["att_sources"]):
        model = convert_sharing(model, ",".join(map(str, stage["kv_sources"])),
                                ",".join(map(str, stage["att_sources"])), cfg.kv_init)
    n = len(model.layers)
    converted = {i for i in range(n) if model.kv_sources[i] != i or model.att_sources[i] != i}
    read = {f"layers.{projection_owner(model, i, w)}.attention.{w}." for i in converted for w in ("wq", "wk", "wv")}
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        p.requires_grad_(not stage["freeze"] or layer in converted or any(name.startswith(r) for r in read))
    return model


def open_log(path, resume_iter):
    """log.jsonl for appending. On a resume from iteration N, lines past N are dropped (that stretch is
    trained again) and so is the eval at N (it is run and logged again): no line appears twice."""
    if resume_iter is not None and os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a crash
            if rec.get("iter", 0) < resume_iter or (rec.get("iter") == resume_iter and "val_loss" not in rec):
                keep.append(line)
        with open(path, "w") as f:
            f.writelines(keep)
    return open(path, "a" if resume_iter is not None else "w")


def check_finite(loss, iter_num, cfg):
    """Stop a diverged run before it writes a NaN checkpoint: the last good one stays."""
    if not math.isfinite(loss):
        raise UsageError(f"the loss is {loss} at iteration {iter_num}: training diverged (try a lower "
                         f"learning_rate, or grad_clip); the last good checkpoint in {cfg.out_dir} is kept")


# ----------------------------------------------------------------------------------------------------

def train(cfg):
    check_settings(cfg)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:  # one process per device, launched by torchrun
        dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg.device)
    else:
        rank, world = 0, 1
    master = rank == 0
    if cfg.gradient_accumulation_steps % world:
        raise UsageError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} "
                         f"is not divisible by the {world} processes")
    accum = cfg.gradient_accumulation_steps // world
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    ptdtype, autocast = precision(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's) ...
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    data, meta = load_dataset(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    model, ckpt, teacher, teacher_from = initial_model(cfg, meta)
    torch.manual_seed(cfg.seed + rank)  # ... but each rank its own dropout stream
    iter_num, best_val_loss = (ckpt["iter_num"], ckpt["best_val_loss"]) if ckpt else (0, float("inf"))
    train_seconds = float(ckpt.get("train_seconds", 0.0)) if ckpt else 0.0  # wall time training, evals excluded
    if cfg.init_from != "scratch":  # the model's shape (and dropout, as set on it) wins over the settings
        for k, v in asdict(model.config).items():
            if k not in ("vocab_size", "block_size"):
                setattr(cfg, k, v)
    if cfg.block_size > model.config.block_size:
        raise UsageError(f"block_size={cfg.block_size} exceeds the model's context {model.config.block_size}")
    # the conversion schedule (see adaptation_stages); without a target, one stage: the model as it is
    if ckpt and ckpt.get("adapt_stages"):
        stages = legacy_stages(ckpt["adapt_stages"], model.config.n_layer, cfg.adapt_freeze)
    else:
        stages = adaptation_stages({"kv_sources": model.kv_sources, "att_sources": model.att_sources},
                                   cfg.kv_share_target, cfg.att_share_target, cfg.adapt_freeze)
    final = len(stages) - 1  # the full fine-tuning at the target

    def stage_at(it):
        return min(it // cfg.adapt_iters, final) if cfg.adapt_iters else final

    def setup(model, stage):
        """Enter the stage; return (raw model, training model, eval model, fresh optimizer)."""
        raw = enter_stage(model, stages[stage], cfg).to(cfg.device)  # the plain module: checkpoints save it
        optimizer = make_optimizer(raw, cfg)
        if cfg.compile:
            # every stage is a new module with the same forward code: without a reset, each stage's compiles
            # (training + no-grad eval) pile up on that code until dynamo's recompile limit turns it eager
            torch._dynamo.reset()
            model = torch.compile(raw)
        else:
            model = raw
        if ddp:
            model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)
        return raw, model, (model.module if ddp else model), optimizer

    # the stage the optimizer state belongs to: a checkpoint written at the first eval of a new stage was
    # saved before the model entered it (the switch happens just after the eval), so it says the old one
    stage = ckpt.get("stage", stage_at(iter_num)) if ckpt else stage_at(iter_num)
    raw_model, model, eval_model, optimizer = setup(model, stage)
    if teacher is not None:  # in the run's dtype under its autocast, compiled when the student is
        teacher = teacher.to(cfg.device)
        teacher_fn = torch.compile(teacher) if cfg.compile else teacher
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")
    if ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UsageError(f"the optimizer state in {ckpt_path} does not fit the model at stage {stage} "
                             f"({str(e).splitlines()[0]})") from None
        states = ckpt["rng_states"]  # one per rank
        if len(states) != world and master:
            print(f"note: the run was saved with {len(states)} process(es), resumed with {world}: "
                  f"dropout streams differ from an uninterrupted run")
        if rank < len(states):
            set_rng_state(states[rank], cfg.device)
        del ckpt

    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
            raise UsageError(f"out_dir={cfg.out_dir} exists and is not a folder")
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create out_dir={cfg.out_dir} ({e.strerror})") from None
        if os.path.exists(ckpt_path + ".tmp"):  # left by a crash mid-save; ckpt.pt itself is whole
            os.remove(ckpt_path + ".tmp")
        print(f"model: {raw_model.num_params() / 1e6:.2f}M params, kv_sources={raw_model.kv_sources}, "
              f"att_sources={raw_model.att_sources}")
        if final:
            print(f"layer-wise conversion: {final} stages of {cfg.adapt_iters} iterations, then full fine-tuning; "
                  f"stages: {stages}")
        print(f"tokens per iteration: {tokens_per_iter:,} = {world} processes x {accum} accumulation "
              f"x {cfg.batch_size} batch x {cfg.block_size} context")
        log = open_log(os.path.join(cfg.out_dir, "log.jsonl"), iter_num if cfg.init_from == "resume" else None)
    # on a terminal, a progress bar with the ETA and the latest figures; piped (CI, nohup), plain lines
    bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="it", dynamic_ncols=True) if (
        master and sys.stderr.isatty()) else None
    say = bar.write if bar else print

    def checkpoint(rng_states):
        save_checkpoint(ckpt_path, {
            "model_args": asdict(raw_model.config), "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "config": asdict(cfg), "meta": meta, "rng_states": rng_states,
            "adapt_stages": stages, "stage": stage, "teacher_from": teacher_from, "train_seconds": train_seconds})

    def progress():
        """What every log line carries for plots: where the run is, in tokens and training seconds."""
        return {"tokens": iter_num * tokens_per_iter, "train_seconds": round(train_seconds, 3), "stage": stage,
                "kv_share": raw_model.config.kv_share, "att_share": raw_model.config.att_share}

    peak_flops = peak_label = None  # measured (if need be) at the first log line, outside the timed window
    t0, window_iters = time.time(), 0
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            rng_states = [rng_state(cfg.device)]  # every rank's, for an exact resume
            if ddp:
                rng_states = [None] * world
                dist.all_gather_object(rng_states, rng_state(cfg.device))
        if master and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters):
            train_seconds += time.time() - t0
            losses = estimate_loss(eval_model, data, cfg, autocast)
            check_finite(losses["val"] + losses["train"], iter_num, cfg)
            say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log.write(json.dumps({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                  **progress(), "kv_sources": raw_model.kv_sources,
                                  "att_sources": raw_model.att_sources}) + "\n")
            log.flush()
            if losses["val"] < best_val_loss or cfg.always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0:
                    checkpoint(rng_states)
            t0, window_iters = time.time(), 0  # eval time is not training time
        if iter_num >= cfg.max_iters:
            break
        if stage_at(iter_num) != stage:  # next adaptation stage: convert more layers, fresh optimizer
            stage = stage_at(iter_num)
            raw_model, model, eval_model, optimizer = setup(raw_model, stage)
            if master:
                say(f"stage {stage}: kv_sources={raw_model.kv_sources}, att_sources={raw_model.att_sources}"
                    + (" (full fine-tuning)" if stage == final else ""))

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = accum * cfg.batch_size  # this rank's rows of the global batch
        x_all, y_all = get_batch(data["train"], world * rows, cfg.block_size, batch_generator(cfg.seed, iter_num),
                                 slice(rank * rows, (rank + 1) * rows))
        iter_loss = iter_ce = iter_kd = iter_hidden = 0.0  # means over micro-steps, on the device until logged
        for micro in range(accum):
            x = x_all[micro * cfg.batch_size:(micro + 1) * cfg.batch_size].to(cfg.device, non_blocking=True)
            y = y_all[micro * cfg.batch_size:(micro + 1) * cfg.batch_size].to(cfg.device, non_blocking=True)
            # DDP all-reduces gradients only on the last micro-step
            sync = contextlib.nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
            with sync, autocast:
                if teacher is None:
                    logits, loss = model(x, y)
                else:
                    hidden_at = block_outputs(raw_model) if cfg.distill_hidden else ()  # the layers compared
                    logits, ce, hidden = model(x, y, hidden_at=hidden_at)
                    with torch.no_grad():
                        teacher_logits, _, teacher_hidden = teacher_fn(x, all_logits=True, hidden_at=hidden_at)
                    kd = distill_loss(logits, teacher_logits, cfg.distill_temperature)
                    mse = hidden_loss(hidden, teacher_hidden)
                    iter_ce, iter_kd = iter_ce + ce.detach() / accum, iter_kd + kd.detach() / accum
                    iter_hidden = iter_hidden + mse.detach() / accum
                    a, h = cfg.distill_alpha, cfg.distill_hidden
                    loss = (1 - a - h) * ce + a * kd + h * mse
                loss = loss / accum  # average, not sum, over micro-steps
            scaler.scale(loss).backward()
            iter_loss += loss.detach()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        window_iters += 1
        if bar:
            bar.update(1)

        if master and iter_num % cfg.log_interval == 0:
            lossf = iter_loss.item()  # .item() waits for the GPU, so only at log time
            check_finite(lossf, iter_num, cfg)
            now = time.time()
            dt, train_seconds = (now - t0) / window_iters, train_seconds + now - t0
            tokens_per_s = tokens_per_iter / dt
            if peak_label is None:
                peak_flops, peak_label = device_peak("flops", cfg.device, ptdtype, cfg.peak_flops)
            frozen = any(not p.requires_grad for p in raw_model.parameters())  # FLOP count assumes full backward
            # the model FLOPs of a step: the student's forward and backward, and the teacher's forward (1/3)
            flops = training_flops_per_token(raw_model.config, cfg.block_size) + (
                training_flops_per_token(teacher.config, cfg.block_size) / 3 if teacher is not None else 0)
            mfu = None if frozen or not peak_flops else flops * tokens_per_s / world / peak_flops
            parts = {"ce": iter_ce.item(), "kd": iter_kd.item()} if teacher is not None else {}
            if cfg.distill_hidden:
                parts["hidden"] = iter_hidden.item()
            if bar:
                bar.set_postfix_str(f"loss {lossf:.4f}, {tokens_per_s:,.0f} tok/s"
                                    + (f", mfu {mfu * 100:.1f}%" if mfu is not None else ""))
            else:
                print(f"iter {iter_num}: loss {lossf:.4f}" + "".join(f", {k} {v:.4f}" for k, v in parts.items())
                      + f", lr {lr:.2e}, {dt * 1000:.1f} ms/iter, {tokens_per_s:,.0f} tok/s"
                      + (f", mfu {mfu * 100:.1f}% of {peak_label}" if mfu is not None else "")
                      + (" (with the teacher's forward)" if mfu is not None and teacher is not None else ""))
            log.write(json.dumps({"iter": iter_num, "loss": lossf, **parts, "lr": lr, "tokens_per_s": tokens_per_s,
                                  "mfu": mfu, "mfu_of": peak_label if mfu is not None else None,
                                  **progress()}) + "\n")
            t0, window_iters = time.time(), 0

    if master:
        log.close()
        if bar:
            bar.close()
            if peak_label:
                print(f"mfu is against {peak_label}" + (" (with the teacher's forward)" if teacher is not None else ""))
    if ddp:
        dist.barrier()  # without it, gloo can abort at exit while a peer is still tearing down
        dist.destroy_process_group()
    return best_val_loss


if __name__ == "__main__":
    run_main(lambda argv: train(configure(TrainConfig(), argv)), sys.argv[1:])
