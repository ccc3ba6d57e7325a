"""Train a LLaMA, plain or with cross-layer K/V or attention sharing, on a prepared dataset.

    python train.py config/train_shakespeare_char_cpu.py --max_iters=500 --kv_share=echo:2
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char.py --gradient_accumulation_steps=2

Settings: the defaults in TrainConfig below, then a config file, then --key=value overrides. Converting a
pretrained model to sharing (one shot or layer by layer) is told in conversion.py, distilling from the model
as it was before the conversion in distill.py; the loop below calls each once per step.
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import (COMPILE, DEVICE, DTYPE, DTYPE_WHY, check_device, configure, keep_freed_memory, precision,
                          run_main)
from data.loader import batch_generator, get_batch, load_dataset
from echo.checkpoint import (config_from_dict, model_from_checkpoint, restore_training_state, resume_checkpoint, rng_state,
                             same_tokens, save_checkpoint)
from echo.conversion import (check_trainable, convert_on_load, describe_run, describe_stage, enter_stage, resumed_stage_num,
                             run_stages, stage_num_at)
from echo.costs import step_flops
from echo.distill import check_distill_settings, compared_layers, load_teacher, teacher_source, training_loss
from echo.measure import device_peak
from echo.pretrained import IMPORTS, load_pretrained
from echo.runlog import RunLog
from model import LLaMA, ModelConfig, UsageError, make_optimizer


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 250
    eval_spacing: str = "even"            # 'even': every eval_interval; 'doubling': at eval_interval x 1, 2, 4, ... (a
                                          # long run's curve on a log axis); both also at iteration 0 and the last
    eval_iters: int = 20
    log_interval: int = 10
    always_save_checkpoint: bool = True   # save at every eval, not only when val loss improves
    eval_only: bool = False               # evaluate the model init_from names (converted, if asked), then stop
    eval_datasets: str = ""               # more val sets evaluated at every eval, e.g. 'wikitext2_smollm2' (same tokens)
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
    # converting to sharing (echo/conversion.py): one shot via kv_share/att_share, or layer-wise via the *_target ones
    kv_init: str = "keep"                 # a producer's K/V start as its own ('keep') or its consumers' mean ('mean')
    kv_share_target: str = ""             # e.g. 'echo:4': convert its consumers top-down, 1, then 2, 4, ... in all
    att_share_target: str = ""            # the same for attention sharing (both may be given)
    adapt_iters: int = 0                  # iterations per stage; after the stages, full fine-tuning to max_iters
    trainable: str = "all"                # all, or the consumers' layers/attention/attention+norms; stages:X trains X
                                          # only in the stages above, then all (echo/conversion.py TRAINABLE)
    # distilling from the model as loaded (echo/distill.py has the loss): weights a (KL) and h (hidden), CE the rest
    distill_alpha: float = 0.0            # a; 0 = off
    distill_hidden: float = 0.0           # h: residual-stream MSE against the teacher's, at distill_hidden_at:
    distill_hidden_at: str = "groups"     # after each source's group (EchoAtt) or 'before_last' layer (SwiftKV)
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

    # settings that are gone, and what says it now (configure names it; old checkpoints still resume)
    RENAMED = {"adapt_freeze": "use trainable=stages:layers for adapt_freeze=True (False was trainable=all, the default)"}


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
    if cfg.eval_spacing not in ("even", "doubling"):
        raise UsageError(f"eval_spacing={cfg.eval_spacing!r}: expected 'even' or 'doubling'")
    layer_wise = bool(cfg.kv_share_target or cfg.att_share_target) or cfg.init_from == "resume"  # resume: its own
    check_trainable(cfg.trainable, layer_wise)
    if cfg.kv_init not in ("keep", "mean"):
        raise UsageError(f"kv_init={cfg.kv_init!r}: expected 'keep' or 'mean'")
    if not (cfg.init_from in ("scratch", "resume") or cfg.init_from.startswith(("ckpt:", *IMPORTS))):
        raise UsageError(f"init_from={cfg.init_from!r}: expected scratch, resume, ckpt:DIR, hf:DIR or gguf:FILE")
    for key in ("kv_share_target", "att_share_target"):
        if getattr(cfg, key) and cfg.init_from == "scratch":
            raise UsageError(f"{key} converts a trained model: use it with init_from=ckpt:DIR, hf:DIR or gguf:FILE")
    check_distill_settings(cfg)
    check_device(cfg.device)
    precision(cfg.device, cfg.dtype)


def load_eval_datasets(cfg, meta):
    """{name: val tokens} of the eval_datasets, each prepared with the run's tokenizer."""
    extra = {}
    for name in filter(None, (n.strip() for n in cfg.eval_datasets.split(","))):
        if name in ("train", "val"):
            raise UsageError(f"eval_datasets: '{name}' names a split of the run's own dataset; name another dataset")
        data, other = load_dataset(SimpleNamespace(data_dir=cfg.data_dir, dataset=name, block_size=cfg.block_size),
                                   splits=("val",))
        if not same_tokens(other, meta):
            raise UsageError(f"eval_datasets: '{name}' is tokenized with other tokens than dataset '{cfg.dataset}': "
                             f"prepare it with the same tokenizer")
        extra[name] = data["val"]
    return extra


def model_config(cfg, vocab_size):
    return config_from_dict({f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if f.name != "vocab_size"}
                            | {"vocab_size": vocab_size})


def evaluates_at(it, cfg):
    """Whether the loop evaluates before iteration it: at 0, at the last, and every eval_interval (even) or at
    eval_interval times a power of two (doubling: 0, K, 2K, 4K, ... iterations)."""
    if it == 0 or it == cfg.max_iters:
        return True
    if cfg.eval_spacing == "even":
        return it % cfg.eval_interval == 0
    steps, rest = divmod(it, cfg.eval_interval)
    return rest == 0 and steps & (steps - 1) == 0


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, data, cfg, autocast, extra=None):
    """Mean loss over eval_iters batches per split, and on the val split of each extra dataset ({name: tokens});
    the same batches every time, so evals compare."""
    model.eval()
    out = {}
    for split, tokens in list(data.items()) + list((extra or {}).items()):  # train (if there is one), val, extras
        g = torch.Generator().manual_seed(1337 + (split != "train"))  # not cfg.seed: runs of any seed compare
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, g)
            with autocast:
                losses.append(model(x.to(cfg.device), y.to(cfg.device))[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------
# Setting up: processes, the model a run starts from, and each stage's model and optimizer

def setup_ddp(cfg):
    """(ddp, rank, world): one process per device when launched by torchrun, else a single process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1
    dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
    return True, dist.get_rank(), dist.get_world_size()


def initial_model(cfg, meta):
    """(model, checkpoint to resume or None, the model as loaded before any conversion or None), as init_from
    says; a fine-tuned model is converted one-shot if kv_share / att_share ask for it."""
    if cfg.init_from == "scratch":
        vocab = meta["vocab_size"]
        if vocab >= 6400:  # pad a large vocabulary to a multiple of 64 (faster matmuls; under 1% more rows)
            vocab = 64 * math.ceil(vocab / 64)
        return LLaMA(model_config(cfg, vocab)), None, None
    if cfg.init_from == "resume":
        ckpt = resume_checkpoint(cfg, meta, os.path.join(cfg.out_dir, "ckpt.pt"))
        model = model_from_checkpoint(ckpt, os.path.join(cfg.out_dir, "ckpt.pt"))
        return (model.set_dropout(cfg.dropout) if "dropout" in cfg.explicit else model), ckpt, None
    loaded = load_pretrained(cfg.init_from, meta, cfg.dataset).set_dropout(cfg.dropout)  # this run's dropout
    return convert_on_load(loaded, cfg), None, loaded


def build(model, stage, cfg, ddp):
    """Enter a conversion stage: (the plain module, which checkpoints save; the module that trains, compiled
    and wrapped for DDP as asked; a fresh optimizer, since the parameters may have changed)."""
    raw = enter_stage(model, stage, cfg.kv_init).to(cfg.device)
    optimizer = make_optimizer(raw, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    if cfg.compile:
        # every stage is a new module with the same forward code: without a reset, each stage's compiles
        # (training + no-grad eval) pile up on that code until dynamo's recompile limit turns it eager. The
        # reset also drops a compiled teacher's code: it recompiles on its next call (once per stage)
        torch._dynamo.reset()
        model = torch.compile(raw)
    else:
        model = raw
    if ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if cfg.device.startswith("cuda") else None)
    return raw, model, optimizer


def all_rng_states(ddp, world, device):
    """Every rank's RNG states, for an exact resume (a collective: every rank calls it)."""
    if not ddp:
        return [rng_state(device)]
    states = [None] * world
    dist.all_gather_object(states, rng_state(device))
    return states


# ----------------------------------------------------------------------------------------------------

def train(cfg):
    check_settings(cfg)
    ddp, rank, world = setup_ddp(cfg)
    master = rank == 0
    if cfg.gradient_accumulation_steps % world:
        raise UsageError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}: not divisible by {world} ranks")
    accum = cfg.gradient_accumulation_steps // world
    ptdtype, autocast = precision(cfg.device, cfg.dtype)
    keep_freed_memory(cfg.device)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's) ...
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    data, meta = load_dataset(cfg, optional=("train",) if cfg.eval_only else ())
    extra = load_eval_datasets(cfg, meta)
    model, ckpt, loaded = initial_model(cfg, meta)
    teacher_from = teacher_source(cfg, ckpt)
    teacher = load_teacher(cfg, meta, teacher_from, loaded, model)
    del loaded  # no reference kept here: the teacher may be that model, else its weights are freed
    torch.manual_seed(cfg.seed + rank)  # ... but each rank its own dropout stream
    if cfg.init_from != "scratch":  # the model's shape (and dropout, as set on it) wins over the settings
        for k, v in asdict(model.config).items():
            if k not in ("vocab_size", "block_size"):
                setattr(cfg, k, v)
    if cfg.block_size > model.config.block_size:
        raise UsageError(f"block_size={cfg.block_size} exceeds the model's context {model.config.block_size}")
    stages = run_stages(model, cfg, ckpt)  # the conversion schedule; without a target, one stage
    iter_num, best_val_loss = (ckpt["iter_num"], ckpt["best_val_loss"]) if ckpt else (0, float("inf"))
    train_seconds = float(ckpt.get("train_seconds", 0.0)) if ckpt else 0.0  # wall time training, evals excluded
    stage_num = resumed_stage_num(ckpt, iter_num, stages, cfg.adapt_iters)
    raw_model, model, optimizer = build(model, stages[stage_num], cfg, ddp)
    if teacher is not None:  # held in the run's dtype (cast once here, not by autocast every step), compiled with
        teacher = teacher.to(cfg.device, ptdtype)  # the student
        teacher = torch.compile(teacher) if cfg.compile else teacher
    scaler = torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.dtype == "float16")
    if ckpt:
        restore_training_state(ckpt, optimizer, scaler, rank, world, cfg.device,
                               f"the optimizer state in {cfg.out_dir}/ckpt.pt does not fit the model at stage {stage_num}")
        del ckpt
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    rows = accum * cfg.batch_size  # this rank's rows of each iteration's global batch
    if master:
        log = RunLog(cfg.out_dir, cfg.max_iters, iter_num, resumed=cfg.init_from == "resume")
        print(describe_run(raw_model, stages, cfg.adapt_iters))
        print(f"dtype {cfg.dtype}: " + ("as set" if "dtype" in cfg.explicit else DTYPE_WHY))
        print(f"tokens per iteration: {tokens_per_iter:,} = {world} processes x {accum} accumulation "
              f"x {cfg.batch_size} batch x {cfg.block_size} context")

    def state():
        """Where the run is, for the log and the checkpoint."""
        return {"tokens": iter_num * tokens_per_iter, "train_seconds": round(train_seconds, 3), "stage": stage_num,
                "kv_share": raw_model.config.kv_share, "att_share": raw_model.config.att_share}

    peak_flops = peak_label = None  # measured (if need be) at the first log line, outside the timed window
    t0, window = time.time(), 0
    while True:
        if evaluates_at(iter_num, cfg):
            rng_states = all_rng_states(ddp, world, cfg.device)
            if master:
                train_seconds += time.time() - t0
                losses = estimate_loss(model.module if ddp else model, data, cfg, autocast, extra)
                log.eval(iter_num, losses, state(), raw_model)
                if losses["val"] < best_val_loss or cfg.always_save_checkpoint:
                    best_val_loss = min(best_val_loss, losses["val"])
                    if iter_num > 0:
                        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                            "model_args": asdict(raw_model.config), "model": raw_model.state_dict(),
                            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
                            "best_val_loss": best_val_loss, "config": asdict(cfg), "meta": meta,
                            "rng_states": rng_states, "adapt_stages": stages, "teacher_from": teacher_from, **state()})
                t0, window = time.time(), 0  # eval time is not training time
        if iter_num >= cfg.max_iters or cfg.eval_only:
            break
        if stage_num_at(iter_num, stages, cfg.adapt_iters) != stage_num:  # next stage: convert more layers
            stage_num = stage_num_at(iter_num, stages, cfg.adapt_iters)
            raw_model, model, optimizer = build(raw_model, stages[stage_num], cfg, ddp)
            if master:
                log.say(f"stage {stage_num}: " + ("full fine-tuning" if stage_num == len(stages) - 1 else
                                              f"converts {describe_stage(stages[stage_num], stages[stage_num - 1])}"))
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x_all, y_all = get_batch(data["train"], world * rows, cfg.block_size, batch_generator(cfg.seed, iter_num),
                                 slice(rank * rows, (rank + 1) * rows))
        compared = compared_layers(raw_model, cfg.distill_hidden_at) if cfg.distill_hidden else ()  # distill_hidden's
        iter_loss, iter_parts = 0.0, {}  # means over micro-steps, kept on the device until logged
        for micro in range(accum):
            x, y = (t[micro * cfg.batch_size:(micro + 1) * cfg.batch_size].to(cfg.device, non_blocking=True)
                    for t in (x_all, y_all))
            # DDP all-reduces gradients only on the last micro-step
            with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext(), autocast:
                loss, parts = training_loss(model, x, y, cfg, teacher, compared)
                loss = loss / accum  # average, not sum, over micro-steps
            scaler.scale(loss).backward()
            iter_loss += loss.detach()
            iter_parts = {k: iter_parts.get(k, 0.0) + v.detach() / accum for k, v in parts.items()}
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num, window = iter_num + 1, window + 1
        if master:
            log.tick()
        if master and iter_num % cfg.log_interval == 0:
            dt, now = (time.time() - t0) / window, time.time()  # .item() below waits for the GPU: at log time only
            train_seconds, t0, window = train_seconds + now - t0, now, 0
            if peak_label is None:
                peak_flops, peak_label = device_peak("flops", cfg.device, ptdtype, cfg.peak_flops)
            flops = step_flops(raw_model, teacher, cfg.block_size) * tokens_per_iter / dt / world  # per process
            mfu = flops / peak_flops if peak_flops else None
            log.step(iter_num, iter_loss.item(), {k: v.item() for k, v in iter_parts.items()}, lr, dt * 1000,
                     tokens_per_iter / dt, mfu, peak_label, state())
    if master:
        log.close()
    if ddp:
        dist.barrier()  # without it, gloo can abort at exit while a peer is still tearing down
        dist.destroy_process_group()
    return best_val_loss


if __name__ == "__main__":
    run_main(lambda argv: train(configure(TrainConfig(), argv)), sys.argv[1:])
