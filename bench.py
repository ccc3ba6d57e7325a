"""Benchmark sharing variants of one model shape side by side, on synthetic tokens.

    python bench.py --quick                                    # tiny shape, under a minute on 2 CPU cores
    python bench.py --preset=gpt2-small --json=bench.json      # on a GPU: bf16 + compile by default
    python bench.py --preset=tinyllama --variants="none;echo:11" --find_max_batch=True
    python bench.py --quick --variants="none;echo:2;att=echo:2;att=0,1,1,3,4,4,6,7"

A variant is a kv_share spec ("echo:2"), "att=SPEC" for attention sharing, or both ("kv=SPEC att=SPEC"). The
parts (--parts) are measured in rounds, each running every variant once (so a noisy machine's drift affects all
alike), and reported as medians: train (tokens/s, MFU, peak memory); distill (train.py's conversion step with the
KD-only loss in parts: the teacher's forward, the student's forward and backward, the optimizer); inference
(prefill, cached decode at batch 1 and decode_batch, short and long context, bytes read and MBU); context (decode
with N positions cached); capacity (each variant at the largest batch whose cache fits a budget: K/V sharing's
payoff); peer (the plain model beside gpt-fast, --peer=gpt-fast:PATH, with our weights and the same greedy tokens
first). MFU and MBU are against a listed GPU's datasheet peak, else a peak measured here; the table says which.
"""
import itertools
import json
import statistics
import sys
from dataclasses import asdict, dataclass, fields, replace
from types import SimpleNamespace

import torch
from tqdm import tqdm

from configurator import COMPILE, DEVICE, DTYPE, check_device, configure, keep_freed_memory, precision, run_main
from echo.checkpoint import config_from_dict
from echo.costs import decode_bytes_per_step, kv_cache_bytes, step_flops, training_flops_per_token
from echo.distill import training_loss
from echo.generate import cache_len, inference_layout
from echo.measure import (Timer, decode_tokens_per_s_at, device_name, device_peak, generation_tokens_per_s,
                          naive_decode_tokens_per_s)
from echo.peer import load_peer, peer_check, peer_decode_at, peer_kernels, peer_model, peer_table
from echo.report import bench_table, plot_capacity, plot_contexts
from model import LLaMA, ModelConfig, UsageError, make_optimizer

PRESETS = {  # model shape and micro-batch
    "tiny": dict(vocab_size=512, block_size=128, n_layer=8, n_head=4, n_kv_head=4, n_embd=128, batch_size=8),
    "shakespeare": dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_kv_head=6, n_embd=384, batch_size=64),
    "gpt2-small": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
                       batch_size=16),
    "tinyllama": dict(vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
                      intermediate_size=5632, tie_embeddings=False, batch_size=4),
    "smollm2": dict(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                    intermediate_size=1536, rope_theta=100000.0, batch_size=4),  # SmolLM2-135M's shape
}


@dataclass
class BenchConfig(ModelConfig):
    preset: str = "tiny"
    variants: str = ""            # ';'-separated (see above); "" = none, echo:L/4, echo:L/2, cla:2, att=echo:L/4
    batch_size: int = 8           # training micro-batch
    rounds: int = 5
    train_steps: int = 10         # timed steps per variant per round, after warmup_steps
    warmup_steps: int = 3
    decode_tokens: int = 64
    decode_batch: int = 8         # the "larger batch" for decode
    short_prompt: int = 32        # short context; the long one fills the window
    parts: str = "train,inference"  # which measurements to run: train, distill, inference, context, capacity, peer
    contexts: str = "256,512,1024,2048,4096"  # parts=context, capacity: decode with this many positions cached
    cache_budget: str = "0.25,0.5,1"  # parts=capacity: KV-cache budgets in GiB (comma-separated, fractions allowed)
    plot: str = ""                # parts=context or capacity: write its figure to this PNG
    peer: str = ""                # parts=peer: gpt-fast:PATH, a clone of pytorch-labs/gpt-fast (see peer.py)
    naive: bool = False           # also time decoding by recomputing the whole context (no cache)
    find_max_batch: bool = False  # GPU: double the micro-batch until out of memory
    quick: bool = False           # a small run for a smoke test
    json: str = ""                # write every figure here
    device: str = DEVICE
    dtype: str = DTYPE
    compile: bool = COMPILE
    peak_flops: float = -1.0      # FLOP/s for MFU; -1 = datasheet (listed GPU, bf16/fp16) or measured; 0 = off
    peak_bytes: float = -1.0      # bytes/s for MBU; -1 = datasheet (listed GPU) or measured; 0 = off


QUICK = dict(rounds=3, train_steps=4, warmup_steps=2, decode_tokens=16, short_prompt=16, decode_batch=4)


def parse(argv):
    """argv as in train.py; the preset (and --quick=True, a short run) fills in what argv does not set."""
    cfg = configure(BenchConfig(), argv)
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown preset '{cfg.preset}': choose from {', '.join(PRESETS)}")
    preset = {"intermediate_size": 0, **PRESETS[cfg.preset], **(QUICK if cfg.quick else {})}  # 0: from the width
    for k, v in preset.items():
        if k not in cfg.explicit:
            setattr(cfg, k, v)
    cfg.__post_init__()  # derive and check the shape
    at_least = dict(rounds=1, train_steps=1, warmup_steps=0, decode_tokens=2, decode_batch=1, short_prompt=1,
                    batch_size=1)
    for key, low in at_least.items():
        if getattr(cfg, key) < low:
            raise UsageError(f"{key}={getattr(cfg, key)}: must be at least {low}")
    check_device(cfg.device)
    precision(cfg.device, cfg.dtype)
    return cfg


def variant_specs(cfg):
    if cfg.variants:
        return [v.strip() for v in cfg.variants.split(";")]
    L = cfg.n_layer
    quarter = max(1, L // 4)
    return list(dict.fromkeys(["none", f"echo:{quarter}", f"echo:{L // 2}", "cla:2", f"att=echo:{quarter}"]))


def variant_sharing(variant):
    """A variant's {"kv_share", "att_share"}: "echo:2" (K/V), "att=echo:2", or "kv=cla:2 att=0,0,2,2"."""
    sharing = {"kv_share": "none", "att_share": "none"}
    for part in variant.split():
        kind, eq, spec = part.partition("=")
        if not eq:
            kind, spec = "kv", part
        if kind not in ("kv", "att"):
            raise UsageError(f"variant '{variant}': expected a kv_share spec, att=SPEC or kv=SPEC att=SPEC")
        sharing[f"{kind}_share"] = spec
    return sharing


class Variant:
    """One sharing variant: its model (parked on the CPU between turns) and, with compile, its compiled form."""

    def __init__(self, cfg, spec):
        torch.manual_seed(0)
        self.spec, self.cfg = spec, cfg
        self.model = LLaMA(config_from_dict({f.name: getattr(cfg, f.name) for f in fields(ModelConfig)}
                                            | variant_sharing(spec)))
        self.train_fn = torch.compile(self.model) if cfg.compile else self.model

    def tokens(self, b, t):
        return torch.randint(0, self.cfg.vocab_size, (b, t), device=self.cfg.device)

    def train_ms(self, batch_size, warmup, steps):
        """Median ms per training step (forward, backward, AdamW with train.py's defaults) at this micro-batch."""
        optimizer = make_optimizer(self.model, 1e-3, 0.1, (0.9, 0.99))
        x, y = self.tokens(batch_size, self.cfg.block_size), self.tokens(batch_size, self.cfg.block_size)
        autocast, times = precision(self.cfg.device, self.cfg.dtype)[1], []
        for i in range(warmup + steps):
            with Timer(self.cfg.device) as t:
                with autocast:
                    loss = self.train_fn(x, y)[1]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times += [t.seconds * 1000] if i >= warmup else []
        return statistics.median(times)

    def max_batch(self):
        """Largest micro-batch, doubling from batch_size, whose training step fits in GPU memory."""
        b, fits = self.cfg.batch_size, None
        while b <= 64 * self.cfg.batch_size:
            try:
                self.train_ms(b, warmup=0, steps=1)
                fits, b = b, 2 * b
            except torch.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
        return fits


# ----------------------------------------------------------------------------------------------------
# The parts: each measures one variant once (a round) and returns {figure: value}; the medians over rounds come
# later. `setup` holds what the parts share: the dtype, batches, prompts, contexts, cache budgets, teacher, peer.

def measure_train(v, cfg, setup):
    return {"train_ms_per_iter": v.train_ms(cfg.batch_size, cfg.warmup_steps, cfg.train_steps)}


def measure_distill(v, cfg, setup):
    """Median ms of a conversion step's parts, as train.py runs it with the KD-only loss: the teacher's forward
    alone (without its head: the chunked loss applies both heads); the step's forward and backward (training_loss,
    the teacher's forward inside); the optimizer's step; and the student's no-grad forward on one batch, as an
    eval runs it."""
    kd_only = SimpleNamespace(distill_alpha=1.0, distill_hidden=0.0, distill_temperature=1.0)
    optimizer = make_optimizer(v.model, 1e-3, 0.1, (0.9, 0.99))
    x, y = v.tokens(cfg.batch_size, cfg.block_size), v.tokens(cfg.batch_size, cfg.block_size)
    autocast = precision(cfg.device, cfg.dtype)[1]
    parts = {"distill_teacher_ms": [], "distill_fwd_bwd_ms": [], "distill_optimizer_ms": [], "eval_forward_ms": []}
    for i in range(cfg.warmup_steps + cfg.train_steps):
        with Timer(cfg.device) as teacher_t, torch.inference_mode(), autocast:
            setup.teacher(x, head=False)
        with Timer(cfg.device) as fwd_bwd:
            with autocast:
                loss = training_loss(v.train_fn, x, y, kd_only, setup.teacher)[0]
            loss.backward()
        with Timer(cfg.device) as step:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        v.model.eval()
        with Timer(cfg.device) as evaluation, torch.no_grad(), autocast:
            v.train_fn(x, y)
        v.model.train()
        for key, t in zip(parts, (teacher_t, fwd_bwd, step, evaluation)):
            parts[key] += [t.seconds * 1000] if i >= cfg.warmup_steps else []
    return {key: statistics.median(times) for key, times in parts.items()}


def measure_inference(v, cfg, setup):
    out = {}
    for batch, (context, prompt) in itertools.product(setup.batches, setup.prompts):
        out[f"prefill_tok_s_b{batch}_{context}"], out[f"decode_tok_s_b{batch}_{context}"] = generation_tokens_per_s(
            v.model, v.tokens(batch, prompt), cfg.decode_tokens, cfg.compile)
    if cfg.naive:
        out["naive_decode_tok_s_b1_short"] = naive_decode_tokens_per_s(v.model, v.tokens(1, cfg.short_prompt),
                                                                       cfg.decode_tokens)
    return out


def measure_context(v, cfg, setup):
    return {f"ctx_decode_tok_s_b{batch}_{c}": decode_tokens_per_s_at(v.model, batch, c, cfg.decode_tokens, cfg.compile)
            for batch, c in itertools.product(setup.batches, setup.contexts)}


def measure_capacity(v, cfg, setup):
    out = {}
    for gib, c in itertools.product(setup.budgets, setup.contexts):
        batch = out[f"cap_batch_{gib}_{c}"] = capacity(v.model.config, gib, c + cfg.decode_tokens, setup.dtype.itemsize)
        out[f"cap_tok_s_{gib}_{c}"] = (decode_tokens_per_s_at(v.model, batch, c, cfg.decode_tokens, cfg.compile)
                                       if batch else 0.0)
        v.model.kv_cache = None  # the next budget's cache is another size
    return out


def measure_peer(v, cfg, setup):
    """The plain model and gpt-fast with its weights: eager and compiled, each compiled afresh for every shape."""
    if v.spec != "none":
        return {}
    peer, out = peer_model(setup.peer, v.model), {}
    for batch, c, mode in itertools.product(setup.batches, setup.contexts, ("eager", "compiled")):
        torch._dynamo.reset()  # one static graph per shape for both, never a dynamic-shape one
        out[f"peer_ours_{mode}_b{batch}_{c}"] = decode_tokens_per_s_at(v.model, batch, c, cfg.decode_tokens,
                                                                       mode == "compiled")
        out[f"peer_gptfast_{mode}_b{batch}_{c}"] = peer_decode_at(peer, batch, c, cfg.decode_tokens, mode == "compiled")
    return out


PARTS = {"train": measure_train, "distill": measure_distill, "inference": measure_inference,
         "context": measure_context, "capacity": measure_capacity, "peer": measure_peer}


def turn(v, part, cfg, setup, samples):
    """One variant's measurements of a part, with its model on the device (in the inference layout and the run's
    dtype for inference, as sample.py decodes), then parked on the CPU."""
    cuda = "cuda" in cfg.device
    v.model.to(cfg.device)
    if part not in ("train", "distill"):
        inference_layout(v.model.to(setup.dtype))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for key, value in PARTS[part](v, cfg, setup).items():
        samples[v.spec].setdefault(key, []).append(value)
    if cuda:  # training and inference peaks apart: one figure mixing both would mean neither
        key = f"{part}_peak_memory_gib" if part in ("train", "distill") else "inference_peak_memory_gib"
        samples[v.spec].setdefault(key, []).append(torch.cuda.max_memory_allocated() / 2**30)
    v.model.float().to("cpu")
    v.model.kv_cache = None  # free it before the next variant's turn
    if cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# What the medians mean: tokens/s, FLOPs and MFU, bytes and MBU, each from the counts of echo/costs.py

def train_figures(r, v, cfg, setup, peaks):
    tok_s = cfg.batch_size * cfg.block_size / (r["train_ms_per_iter"] / 1000)
    flops, base = (training_flops_per_token(c, cfg.block_size)
                   for c in (v.model.config, replace(v.model.config, kv_share="none", att_share="none")))
    mfu = (lambda f: f * tok_s / peaks["peak_flops"] if peaks["peak_flops"] else None)  # noqa: E731
    return {"train_tok_s": tok_s, "flops_per_token": flops, "baseline_flops_per_token": base, "mfu": mfu(flops),
            "mfu_baseline_flops": mfu(base)}


def distill_figures(r, v, cfg, setup, peaks):
    """The student's forward and backward: the step's, less the teacher's forward."""
    step_ms = r["distill_fwd_bwd_ms"] + r["distill_optimizer_ms"]
    tok_s = cfg.batch_size * cfg.block_size / (step_ms / 1000)
    flops = step_flops(v.model, setup.teacher, cfg.block_size)
    return {"distill_student_ms": r["distill_fwd_bwd_ms"] - r["distill_teacher_ms"], "distill_step_ms": step_ms,
            "distill_teacher_share": r["distill_teacher_ms"] / step_ms, "distill_tok_s": tok_s,
            "distill_flops_per_token": flops,
            "distill_mfu": flops * tok_s / peaks["peak_flops"] if peaks["peak_flops"] else None}


def decode_figures(r, v, cfg, setup, peaks):
    """Bytes per token, GB/s and MBU of each decode measurement: a step reads the weights and the whole cache slots
    it attends over (the mask hides positions, it does not skip them)."""
    out = {}
    per_token = lambda batch, positions: decode_bytes_per_step(  # noqa: E731
        v.model.config, batch, positions, setup.dtype.itemsize) / batch
    mbu = lambda b, tok_s: b * tok_s / peaks["peak_bytes"] if peaks["peak_bytes"] else None  # noqa: E731
    for batch, (context, prompt) in itertools.product(setup.batches, setup.prompts):
        name = f"b{batch}_{context}"
        if f"decode_tok_s_{name}" in r:
            b, tok_s = per_token(batch, cache_len(v.model, prompt, cfg.decode_tokens)), r[f"decode_tok_s_{name}"]
            out |= {f"decode_bytes_per_token_{name}": b, f"decode_gb_s_{name}": b * tok_s / 1e9,
                    f"decode_mbu_{name}": mbu(b, tok_s)}
    for batch, c in itertools.product(setup.batches, setup.contexts):
        b = per_token(batch, c + cfg.decode_tokens)
        if f"ctx_decode_tok_s_b{batch}_{c}" in r:
            out[f"ctx_decode_gb_s_b{batch}_{c}"] = b * r[f"ctx_decode_tok_s_b{batch}_{c}"] / 1e9
        for run in (f"{impl}_{mode}_b{batch}_{c}" for impl in ("ours", "gptfast") for mode in ("eager", "compiled")):
            if f"peer_{run}" in r:  # both read the same weights and cache: the MBU of each against one limit
                out[f"peer_mbu_{run}"] = mbu(b, r[f"peer_{run}"])
    return out


def check_parts(cfg):
    """The parts asked for, and one line for settings they cannot run with."""
    parts = [p for p in PARTS if p in {p.strip() for p in cfg.parts.split(",")}]
    if not parts or {p.strip() for p in cfg.parts.split(",")} - set(PARTS):
        raise UsageError(f"parts={cfg.parts!r}: expected train, distill, inference, context, capacity and/or peer, "
                         f"comma-separated")
    if "peer" in parts and variant_specs(cfg)[0] != "none":
        raise UsageError("parts=peer compares the plain model: make 'none' the first variant")
    if cfg.plot and len(set(parts) & {"context", "capacity"}) != 1:
        raise UsageError("--plot draws the context or the capacity measurements: give one of --parts=context "
                         "or --parts=capacity")
    if "inference" in parts and cfg.short_prompt + cfg.decode_tokens > cfg.block_size:
        raise UsageError(f"short_prompt + decode_tokens = {cfg.short_prompt + cfg.decode_tokens} "
                         f"exceeds block_size={cfg.block_size}")
    return parts


def run(cfg):
    """Every part asked for, in rounds over the variants; then (results per variant, the peaks used)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # every variant compiles the same forward: allow the recompiles
    parts = check_parts(cfg)
    keep_freed_memory(cfg.device)  # as train.py
    long_prompt = cfg.block_size - cfg.decode_tokens  # the long context fills the window
    setup = SimpleNamespace(
        dtype=precision(cfg.device, cfg.dtype)[0], batches=list(dict.fromkeys((1, cfg.decode_batch))),
        prompts=[("short", cfg.short_prompt)] + ([("long", long_prompt)] if long_prompt > cfg.short_prompt else []),
        contexts=context_list(cfg) if {"context", "capacity", "peer"} & set(parts) else [],
        budgets=budget_list(cfg) if "capacity" in parts else [],
        peer=load_peer(cfg.peer) if "peer" in parts else None, teacher=None)
    variants = [Variant(cfg, spec) for spec in variant_specs(cfg)]
    samples = {v.spec: {} for v in variants}
    if "distill" in parts:  # the unconverted model of the same shape, frozen, as train.py holds its default teacher
        teacher = LLaMA(replace(variants[0].model.config, kv_share="none", att_share="none"))
        teacher.eval().requires_grad_(False).to(cfg.device, setup.dtype)
        setup.teacher = torch.compile(teacher) if cfg.compile else teacher
    if setup.peer:  # before any timing: the same weights must give the same greedy tokens in both
        model = inference_layout(variants[0].model.to(cfg.device))
        samples["none"]["peer_check"] = [{"tokens_identical": peer_check(model, setup.peer),
                                          "kernels": peer_kernels(model, setup.peer)}]
        variants[0].model.to("cpu").kv_cache = None
    for part in parts:  # a round runs every variant once, so drift on a noisy machine affects all alike
        bar = tqdm(total=cfg.rounds * len(variants), desc=part, unit="turn") if sys.stderr.isatty() else None
        for r in range(cfg.rounds):
            if not bar:  # piped: one line per round
                print(f"{part} round {r + 1}/{cfg.rounds}", file=sys.stderr)
            for v in variants:
                turn(v, part, cfg, setup, samples)
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
    peaks = dict(zip(("peak_flops", "flops"), device_peak("flops", cfg.device, setup.dtype, cfg.peak_flops)))
    peaks |= dict(zip(("peak_bytes", "bytes"), device_peak("bytes", cfg.device, setup.dtype, cfg.peak_bytes)))
    results = {}
    for v in variants:
        r = {k: statistics.median(vals) if k != "peer_check" else vals[0] for k, vals in samples[v.spec].items()}
        r |= {"kv_sources": v.model.kv_sources, "att_sources": v.model.att_sources, "params": v.model.num_params(),
              "kv_bytes_per_token": kv_cache_bytes(v.model.config, 1, 1, setup.dtype.itemsize)}
        r |= train_figures(r, v, cfg, setup, peaks) if "train" in parts else {}
        r |= distill_figures(r, v, cfg, setup, peaks) if "distill" in parts else {}
        r |= decode_figures(r, v, cfg, setup, peaks)
        if cfg.find_max_batch and "cuda" in cfg.device and "train" in parts:
            v.model.to(cfg.device)
            r["max_micro_batch"] = v.max_batch()
            v.model.to("cpu")
        results[v.spec] = r
    return results, peaks


def capacity(config, gib, positions, bytes_per_element):
    """The largest batch whose KV cache of `positions` positions fits in `gib` GiB (0 if not even one)."""
    return int(gib * 2**30 // kv_cache_bytes(config, 1, positions, bytes_per_element))


def budget_list(cfg):
    """parts=capacity: the KV-cache budgets in GiB, each a number > 0."""
    try:
        budgets = [float(b) for b in cfg.cache_budget.split(",")]
    except ValueError:
        budgets = []
    if not budgets or not all(0 < b < float("inf") for b in budgets):
        raise UsageError(f"cache_budget={cfg.cache_budget!r}: expected GiB > 0, comma-separated (e.g. 0.5,1,2)")
    return budgets


def context_list(cfg):
    """parts=context: the cached lengths to decode at, each leaving room for decode_tokens in the window."""
    try:
        contexts = [int(c) for c in cfg.contexts.split(",")]
    except ValueError:
        raise UsageError(f"contexts={cfg.contexts!r}: expected comma-separated whole numbers") from None
    bad = [c for c in contexts if not 1 <= c <= cfg.block_size - cfg.decode_tokens]
    if bad:
        raise UsageError(f"contexts: {bad[0]} is out of range: each must be 1 to block_size - decode_tokens = "
                         f"{cfg.block_size - cfg.decode_tokens}")
    return contexts


def main(argv):
    cfg = parse(argv)
    results, peaks = run(cfg)
    print(bench_table(results, cfg, peaks))
    if "peer" in cfg.parts:
        print(peer_table(results["none"], list(dict.fromkeys((1, cfg.decode_batch))), context_list(cfg)))
    if cfg.plot:
        if "context" in cfg.parts:
            plot_contexts(results, cfg, context_list(cfg), cfg.plot)
        else:
            plot_capacity(results, cfg, context_list(cfg), budget_list(cfg), cfg.plot)
        print(f"wrote {cfg.plot}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"device": device_name(cfg.device), "torch": torch.__version__, "config": asdict(cfg),
                       "peaks": peaks, "results": results}, f, indent=1)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
