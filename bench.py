"""Benchmark sharing variants of one model shape side by side, on synthetic tokens.

    python bench.py --quick                                    # tiny shape, under a minute on 2 CPU cores
    python bench.py --preset=gpt2-small --json=bench.json      # on a GPU: bf16 + compile by default
    python bench.py --preset=tinyllama --variants="none;echo:11" --find_max_batch=True
    python bench.py --quick --variants="none;echo:2;att=echo:2;att=0,1,1,3,4,4,6,7"

A variant is a kv_share spec ("echo:2"), or "att=SPEC" for attention sharing, or both ("kv=SPEC att=SPEC").

Training (tokens/s, ms/iter, MFU, peak memory), a conversion step's time split (parts=distill: train.py's step
with the KD-only loss, the teacher's forward apart from the student's forward and backward and the optimizer's
step, and an eval batch's forward) and inference (prefill, cached decode at batch 1 and a
larger batch, short and long context, KV bytes per token, decode bandwidth and MBU) are measured in rounds:
parts=context decodes with a given number of positions cached; parts=capacity at a fixed KV-cache budget,
each variant at the largest batch whose cache fits it (K/V sharing's payoff: more sequences in the memory);
parts=peer decodes the plain model beside gpt-fast (--peer=gpt-fast:PATH) with the same weights, after checking
that both continue a prompt with the same greedy tokens: eager and compiled, kernels per step, over contexts.
each round runs every variant once, so drift on a noisy machine affects all alike; figures are medians over
rounds. MFU and MBU are against the datasheet peak of a listed GPU, else against a peak measured here
(a 2048^2 matmul; a 512 MiB read on a CPU); the table's head says which.
"""
import itertools
import json
import statistics
import sys
from dataclasses import asdict, dataclass, fields, replace
from types import SimpleNamespace

import torch
from tqdm import tqdm

from configurator import COMPILE, DEVICE, DTYPE, check_device, configure, precision, run_main
from echo.generate import cache_len, compile_decode_step, generate_tokens, inference_layout
from echo.checkpoint import config_from_dict
from model import LLaMA, ModelConfig, UsageError, make_optimizer
from tools.peer import load_peer, peer_check, peer_decode_at, peer_model, peer_table
from echo.costs import decode_bytes_per_step, kv_cache_bytes, step_flops, training_flops_per_token
from echo.distill import training_loss
from echo.measure import Timer, decode_tokens_per_s, device_name, device_peak
from tools.plotting import plot_capacity, plot_contexts

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
    """One sharing variant: its model (parked on the CPU between turns) and compiled forms."""

    def __init__(self, cfg, spec):
        torch.manual_seed(0)
        self.spec, self.cfg = spec, cfg
        self.model = LLaMA(config_from_dict({f.name: getattr(cfg, f.name) for f in fields(ModelConfig)}
                                            | variant_sharing(spec)))
        self.train_fn = torch.compile(self.model) if cfg.compile else self.model

    def tokens(self, b, t):
        return torch.randint(0, self.cfg.vocab_size, (b, t), device=self.cfg.device)

    def train_ms(self, batch_size, warmup, steps):
        """Median ms per training step (forward, backward, AdamW) at this micro-batch."""
        cfg = self.cfg
        optimizer = make_optimizer(self.model, 1e-3, 0.1, (0.9, 0.99))  # train.py's defaults
        x, y = self.tokens(batch_size, cfg.block_size), self.tokens(batch_size, cfg.block_size)
        autocast = precision(cfg.device, cfg.dtype)[1]
        times = []
        for i in range(warmup + steps):
            with Timer(cfg.device) as t:
                with autocast:
                    loss = self.train_fn(x, y)[1]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(t.seconds * 1000)
        return statistics.median(times)

    def distill_ms(self, teacher, warmup, steps):
        """Median ms of a conversion step's parts at batch_size, as train.py runs it with the KD-only loss: the
        teacher's forward alone; the step's forward and backward (training_loss, the teacher's forward inside);
        the optimizer's step; and the student's no-grad forward on one batch, as an eval runs it."""
        cfg, kd_only = self.cfg, SimpleNamespace(distill_alpha=1.0, distill_hidden=0.0, distill_temperature=1.0)
        optimizer = make_optimizer(self.model, 1e-3, 0.1, (0.9, 0.99))
        x, y = self.tokens(cfg.batch_size, cfg.block_size), self.tokens(cfg.batch_size, cfg.block_size)
        autocast = precision(cfg.device, cfg.dtype)[1]
        parts = {"distill_teacher_ms": [], "distill_fwd_bwd_ms": [], "distill_optimizer_ms": [], "eval_forward_ms": []}
        for i in range(warmup + steps):
            with Timer(cfg.device) as teacher_t, torch.no_grad(), autocast:
                teacher(x, all_logits=True)
            with Timer(cfg.device) as fwd_bwd:
                with autocast:
                    loss = training_loss(self.train_fn, x, y, kd_only, teacher)[0]
                loss.backward()
            with Timer(cfg.device) as step:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.model.eval()
            with Timer(cfg.device) as evaluation, torch.no_grad(), autocast:
                self.train_fn(x, y)
            self.model.train()
            if i >= warmup:
                for key, t in zip(parts, (teacher_t, fwd_bwd, step, evaluation)):
                    parts[key].append(t.seconds * 1000)
        return {key: statistics.median(times) for key, times in parts.items()}

    @torch.no_grad()
    def generation(self, batch, prompt_len):
        """(prefill tokens/s, cached decode tokens/s) for a batch of prompt_len-token prompts."""
        prompt = self.tokens(batch, prompt_len)
        step = None
        if self.cfg.compile:  # compiled, CUDA graph recorded and replayed once, all before timing
            step = compile_decode_step(self.model, batch, cache_len(self.model, prompt_len, self.cfg.decode_tokens))
        run = lambda: generate_tokens(self.model, prompt, self.cfg.decode_tokens, temperature=0,  # noqa: E731
                                                 step=step)
        for _ in zip(range(3), run()):  # untimed warm-up on the same cache (allocations, prefill shapes)
            pass
        tokens = run()
        with Timer(self.cfg.device) as prefill:
            next(tokens)
        with Timer(self.cfg.device) as decode:
            for _ in tokens:
                pass
        return batch * prompt_len / prefill.seconds, batch * (self.cfg.decode_tokens - 1) / decode.seconds

    @torch.no_grad()
    def decode_at(self, batch, context, compiled=None):
        """Decode tokens/s with `context` positions already in the cache. No prefill is run: every step attends
        over the whole cache (masked), so its work and bytes depend on the cache's length, not its values."""
        step = self.model
        if self.cfg.compile if compiled is None else compiled:
            step = compile_decode_step(self.model, batch, context + self.cfg.decode_tokens)
        self.model.setup_cache(batch, context + self.cfg.decode_tokens)
        return decode_tokens_per_s(step, self.tokens(batch, 1), context, self.cfg.decode_tokens, self.cfg.device)

    @torch.no_grad()
    def naive_decode(self, prompt_len):
        """Tokens/s at batch 1 when each new token recomputes the whole context (how nanoGPT samples)."""
        idx = self.tokens(1, prompt_len)
        with Timer(self.cfg.device) as t:
            for _ in range(self.cfg.decode_tokens):
                idx = torch.cat((idx, self.model(idx)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
        return self.cfg.decode_tokens / t.seconds

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


def run(cfg):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # every variant compiles the same forward: allow the recompiles
    cuda = "cuda" in cfg.device
    dtype = precision(cfg.device, cfg.dtype)[0]
    parts = {p.strip() for p in cfg.parts.split(",")}
    if not parts or parts - {"train", "distill", "inference", "context", "capacity", "peer"}:
        raise UsageError(f"parts={cfg.parts!r}: expected train, distill, inference, context, capacity and/or peer, "
                         f"comma-separated")
    decode_contexts = context_list(cfg) if parts & {"context", "capacity", "peer"} else []
    peer_module = load_peer(cfg.peer) if "peer" in parts else None
    if peer_module and variant_specs(cfg)[0] != "none":
        raise UsageError("parts=peer compares the plain model: make 'none' the first variant")
    budgets = budget_list(cfg) if "capacity" in parts else []
    if cfg.plot and len(parts & {"context", "capacity"}) != 1:
        raise UsageError("--plot draws the context or the capacity measurements: give one of --parts=context "
                         "or --parts=capacity")
    if "inference" in parts and cfg.short_prompt + cfg.decode_tokens > cfg.block_size:
        raise UsageError(f"short_prompt + decode_tokens = {cfg.short_prompt + cfg.decode_tokens} "
                         f"exceeds block_size={cfg.block_size}")
    variants = [Variant(cfg, spec) for spec in variant_specs(cfg)]
    samples = {v.spec: {} for v in variants}
    long_prompt = cfg.block_size - cfg.decode_tokens  # the long context fills the window
    contexts = [("short", cfg.short_prompt)] + ([("long", long_prompt)] if long_prompt > cfg.short_prompt else [])

    teacher = None
    if "distill" in parts:  # the unconverted model of the same shape, frozen, as train.py's default teacher
        teacher = LLaMA(replace(variants[0].model.config, kv_share="none", att_share="none"))
        teacher.eval().requires_grad_(False).to(cfg.device)
        teacher = torch.compile(teacher) if cfg.compile else teacher

    def turn(v, measure):
        """Run one variant's measurements with its model on the device, then park it."""
        v.model.to(cfg.device)
        if measure not in (train_round, distill_round):  # inference in the model dtype and layout, as sample.py
            inference_layout(v.model.to(dtype))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for key, value in measure(v).items():
            samples[v.spec].setdefault(key, []).append(value)
        if cuda:  # training and inference peaks apart: one figure mixing both would mean neither
            key = {train_round: "train_peak_memory_gib", distill_round: "distill_peak_memory_gib"}.get(
                measure, "inference_peak_memory_gib")
            samples[v.spec].setdefault(key, []).append(torch.cuda.max_memory_allocated() / 2**30)
        v.model.float().to("cpu")
        v.model.kv_cache = None  # free it before the next variant's turn
        if cuda:
            torch.cuda.empty_cache()

    def train_round(v):
        return {"train_ms_per_iter": v.train_ms(cfg.batch_size, cfg.warmup_steps, cfg.train_steps)}

    def distill_round(v):
        return v.distill_ms(teacher, cfg.warmup_steps, cfg.train_steps)

    def inference_round(v):
        out = {}
        for batch in dict.fromkeys((1, cfg.decode_batch)):
            for context, prompt in contexts:
                name = f"b{batch}_{context}"
                out[f"prefill_tok_s_{name}"], out[f"decode_tok_s_{name}"] = v.generation(batch, prompt)
        if cfg.naive:
            out["naive_decode_tok_s_b1_short"] = v.naive_decode(cfg.short_prompt)
        return out

    def context_round(v):
        return {f"ctx_decode_tok_s_b{batch}_{c}": v.decode_at(batch, c)
                for batch in dict.fromkeys((1, cfg.decode_batch)) for c in decode_contexts}

    def peer_round(v):  # the plain model and gpt-fast with its weights: eager and compiled, each compiled afresh
        if v.spec != "none":
            return {}
        peer, out = peer_model(peer_module, v.model), {}
        for batch in dict.fromkeys((1, cfg.decode_batch)):
            for c in decode_contexts:
                for mode in ("eager", "compiled"):
                    torch._dynamo.reset()  # one static graph per shape for both, never a dynamic-shape one
                    out[f"peer_ours_{mode}_b{batch}_{c}"] = v.decode_at(batch, c, compiled=mode == "compiled")
                    out[f"peer_gptfast_{mode}_b{batch}_{c}"] = peer_decode_at(peer, batch, c, cfg.decode_tokens,
                                                                              mode == "compiled")
        return out

    def capacity_round(v):
        out = {}
        for gib in budgets:
            for c in decode_contexts:
                batch = capacity(v.model.config, gib, c + cfg.decode_tokens, dtype.itemsize)
                out[f"cap_batch_{gib}_{c}"] = batch
                out[f"cap_tok_s_{gib}_{c}"] = v.decode_at(batch, c) if batch else 0.0
                v.model.kv_cache = None  # the next budget's cache is another size
        return out

    if peer_module:  # before any timing: the same weights must give the same greedy tokens in both
        samples["none"]["peer_check"] = [peer_check(inference_layout(variants[0].model.to(cfg.device)), peer_module)]
        variants[0].model.to("cpu").kv_cache = None
    for measure in (train_round, distill_round, inference_round, context_round, capacity_round, peer_round):
        if measure.__name__.split("_")[0] not in parts:
            continue
        name = measure.__name__.replace("_", " ")
        # on a terminal a progress bar over rounds x variants; piped, one line per round
        bar = tqdm(total=cfg.rounds * len(variants), desc=name + "s", unit="turn") if sys.stderr.isatty() else None
        for r in range(cfg.rounds):
            if not bar:
                print(f"{name} {r + 1}/{cfg.rounds}", file=sys.stderr)
            for v in variants:
                turn(v, measure)
                if bar:
                    bar.update(1)
        if bar:
            bar.close()

    peak_flops, flops_label = device_peak("flops", cfg.device, dtype, cfg.peak_flops)
    peak_bytes, bytes_label = device_peak("bytes", cfg.device, dtype, cfg.peak_bytes)
    base_flops = training_flops_per_token(replace(variants[0].model.config, kv_share="none", att_share="none"),
                                          cfg.block_size)
    results = {}
    for v in variants:
        r = {k: statistics.median(vals) if k != "peer_check" else vals[0] for k, vals in samples[v.spec].items()}
        r.update({"kv_sources": v.model.kv_sources, "att_sources": v.model.att_sources, "params": v.model.num_params(),
                  "kv_bytes_per_token": kv_cache_bytes(v.model.config, 1, 1, dtype.itemsize)})
        if "train" in parts:
            tok_s = cfg.batch_size * cfg.block_size / (r["train_ms_per_iter"] / 1000)
            flops = training_flops_per_token(v.model.config, cfg.block_size)
            r.update({"train_tok_s": tok_s, "flops_per_token": flops, "baseline_flops_per_token": base_flops,
                      "mfu": flops * tok_s / peak_flops if peak_flops else None,
                      "mfu_baseline_flops": base_flops * tok_s / peak_flops if peak_flops else None})
        if "distill" in parts:  # the student's forward and backward: the step's, less the teacher's forward
            step_ms = r["distill_fwd_bwd_ms"] + r["distill_optimizer_ms"]
            tok_s = cfg.batch_size * cfg.block_size / (step_ms / 1000)
            flops = step_flops(v.model, teacher, cfg.block_size)
            r.update({"distill_student_ms": r["distill_fwd_bwd_ms"] - r["distill_teacher_ms"],
                      "distill_step_ms": step_ms, "distill_teacher_share": r["distill_teacher_ms"] / step_ms,
                      "distill_tok_s": tok_s, "distill_flops_per_token": flops,
                      "distill_mfu": flops * tok_s / peak_flops if peak_flops else None})
        for batch in dict.fromkeys((1, cfg.decode_batch)) if "inference" in parts else ():
            for context, prompt in contexts:
                # each step reads the weights and the whole cache slots it attends over (the mask hides, not skips)
                name = f"b{batch}_{context}"
                step_bytes = decode_bytes_per_step(v.model.config, batch,
                                                   cache_len(v.model, prompt, cfg.decode_tokens), dtype.itemsize)
                r[f"decode_bytes_per_token_{name}"] = step_bytes / batch
                r[f"decode_gb_s_{name}"] = step_bytes / batch * r[f"decode_tok_s_{name}"] / 1e9
                r[f"decode_mbu_{name}"] = r[f"decode_gb_s_{name}"] * 1e9 / peak_bytes if peak_bytes else None
        for batch in dict.fromkeys((1, cfg.decode_batch)) if "context" in parts else ():
            for c in decode_contexts:  # a step reads the weights and each layer's K and V over the whole cache
                step_bytes = decode_bytes_per_step(v.model.config, batch, c + cfg.decode_tokens, dtype.itemsize)
                r[f"ctx_decode_gb_s_b{batch}_{c}"] = step_bytes / batch * r[f"ctx_decode_tok_s_b{batch}_{c}"] / 1e9
        for batch in dict.fromkeys((1, cfg.decode_batch)) if "peer" in parts and v.spec == "none" else ():
            for c in decode_contexts:  # both read the same weights and cache: MBU of each against one limit
                step_bytes = decode_bytes_per_step(v.model.config, batch, c + cfg.decode_tokens, dtype.itemsize)
                for impl, mode in itertools.product(("ours", "gptfast"), ("eager", "compiled")):
                    run = f"{impl}_{mode}_b{batch}_{c}"
                    r[f"peer_mbu_{run}"] = step_bytes / batch * r[f"peer_{run}"] / peak_bytes if peak_bytes else None
        if cfg.find_max_batch and cuda and "train" in parts:
            v.model.to(cfg.device)
            r["max_micro_batch"] = v.max_batch()
            v.model.to("cpu")
        results[v.spec] = r
    return results, {"flops": flops_label, "bytes": bytes_label, "peak_flops": peak_flops,
                     "peak_bytes": peak_bytes}


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


def table(results, cfg, peaks):
    """Readable rows: each figure and its ratio to the first variant (the baseline)."""
    base = results[next(iter(results))]
    rows = [("params (M)", "params", 1e-6), ("train tok/s", "train_tok_s", 1), ("train ms/iter", "train_ms_per_iter", 1),
            ("MFU % (own FLOPs)", "mfu", 100), ("MFU % (baseline FLOPs)", "mfu_baseline_flops", 100),
            ("train FLOPs/token (G)", "flops_per_token", 1e-9), ("train peak memory GiB", "train_peak_memory_gib", 1),
            ("max micro-batch", "max_micro_batch", 1), ("KV-cache bytes/token", "kv_bytes_per_token", 1),
            ("inference peak mem GiB", "inference_peak_memory_gib", 1),
            ("KD step ms", "distill_step_ms", 1), ("KD: teacher forward ms", "distill_teacher_ms", 1),
            ("KD: student fwd+bwd ms", "distill_student_ms", 1), ("KD: optimizer ms", "distill_optimizer_ms", 1),
            ("KD: teacher share %", "distill_teacher_share", 100), ("KD step tok/s", "distill_tok_s", 1),
            ("KD step MFU %", "distill_mfu", 100), ("KD peak memory GiB", "distill_peak_memory_gib", 1),
            ("eval forward ms/batch", "eval_forward_ms", 1)]
    for k in base:
        if k.startswith("prefill_tok_s_"):
            name = k[len("prefill_tok_s_"):]
            label = name.replace("_", " ")
            rows += [(f"prefill tok/s {label}", k, 1), (f"decode tok/s {label}", f"decode_tok_s_{name}", 1),
                     (f"decode GB/s {label}", f"decode_gb_s_{name}", 1),
                     (f"decode MBU % {label}", f"decode_mbu_{name}", 100)]
    for k in base:
        if k.startswith("ctx_decode_tok_s_"):
            name = k[len("ctx_decode_tok_s_"):]
            batch, context = name.split("_")
            rows += [(f"decode tok/s {batch} ctx {context}", k, 1),
                     (f"decode GB/s {batch} ctx {context}", f"ctx_decode_gb_s_{name}", 1)]
    for k in base:
        if k.startswith("cap_tok_s_"):
            gib, context = k[len("cap_tok_s_"):].split("_")
            rows += [(f"batch in {gib} GiB ctx {context}", f"cap_batch_{gib}_{context}", 1),
                     (f"decode tok/s {gib} GiB ctx {context}", k, 1)]
    if "naive_decode_tok_s_b1_short" in base:
        rows.append(("naive decode tok/s b1 short", "naive_decode_tok_s_b1_short", 1))
    lines = [f"{'':28}" + "".join(f"{spec:>20}" for spec in results)]
    for label, key, scale in rows:
        if base.get(key) is None:
            continue
        cells = []
        for r in results.values():
            val, ratio = r[key] * scale, (r[key] / base[key] if base[key] else float("nan"))
            num = f"{val:,.0f}" if abs(val) >= 1000 else f"{val:.4g}"
            cells.append(f"{num:>12}" + (f" ({ratio:.2f}x)" if r is not base else " " * 8))
        lines.append(f"{label:28}" + "".join(f"{c:>20}" for c in cells))
    head = (f"{cfg.preset}: {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads / {cfg.n_kv_head} KV heads, "
            f"vocab {cfg.vocab_size}, context {cfg.block_size}, batch {cfg.batch_size}, {cfg.dtype}, "
            f"compile={cfg.compile}, {device_name(cfg.device)}\n"
            f"MFU against: {peaks['flops']}; MBU against: {peaks['bytes']}")
    return "\n".join([head] + lines)


def main(argv):
    cfg = parse(argv)
    results, peaks = run(cfg)
    print(table(results, cfg, peaks))
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
