"""What a model costs, and what the device can do, side by side: MFU = training FLOPs per token x tokens/s / peak
FLOP/s (training is compute-bound: against a matmul peak); MBU = decode bytes per step / step time / peak
bytes/s (batch-1 decode is bandwidth-bound: against a memory peak). Top: the counts (cache bytes, matmul
weights, FLOPs, bytes a decode step reads), each following from which layers compute their own q, k and v.
Bottom: the peaks, a datasheet's for a listed GPU, else measured here, so the figures mean the same on any
machine."""
import functools
import platform
import time

import torch

from model import computed_projections, projection_sources, resolve_sharing


# ----------------------------------------------------------------------------------------------------
# What a model computes and reads. A K/V consumer computes only q, an attention consumer only v. Every layer
# still attends, so the attention FLOP term keeps all n_layer layers (PaLM appendix B, as nanoGPT): a
# consumer's scores are recomputed in training, not stored.

def projection_counts(cfg):
    """How many layers compute their own queries, keys and values: {'q': .., 'k': .., 'v': ..}."""
    computes = computed_projections(*resolve_sharing(cfg))
    return {p: sum(c[p] for c in computes) for p in ("q", "k", "v")}


def kv_cache_bytes(cfg, batch_size, max_len, bytes_per_element=2):
    """Closed form: (K slots + V slots) x batch x positions x KV heads x head_dim x element size."""
    n = projection_counts(cfg)
    return (n["k"] + n["v"]) * batch_size * max_len * cfg.n_kv_head * cfg.head_dim * bytes_per_element


def matmul_params(cfg):
    """Weights that take part in a matmul per token: attention and MLP projections and the LM head. Sharing
    removes projections (wq and wk of attention consumers, wk and wv of K/V consumers); every layer keeps wo."""
    d, n = cfg.n_embd, projection_counts(cfg)
    q, kv = d * cfg.n_head * cfg.head_dim, d * cfg.n_kv_head * cfg.head_dim
    wo_mlp = d * cfg.n_head * cfg.head_dim + 3 * d * cfg.intermediate_size
    return n["q"] * q + (n["k"] + n["v"]) * kv + cfg.n_layer * wo_mlp + d * cfg.vocab_size


def training_flops_per_token(cfg, seq_len, frozen=frozenset()):
    """Forward + backward FLOPs per token of a training step. Forward: 2 per matmul weight (multiply + add),
    and per layer, head and position 4 for attention's two matmuls (scores, mixing). Backward: each matmul's
    input gradient (2 per weight) and weight gradient (2), attention's four (dQ, dK, dP, dV: 8). With
    everything training that is 6 per weight and 12 for attention (PaLM appendix B, as nanoGPT).
    frozen: names of parameters that do not train (adapt_freeze). Autograd then computes only the gradients
    that lead to a trained weight: a frozen weight gets no weight gradient, and nothing below the lowest
    trained weight runs backward at all. So this follows, tensor by tensor, which ones need a gradient."""
    kv_sources, att_sources = resolve_sharing(cfg)
    d, hd, inner = cfg.n_embd, cfg.head_dim, cfg.intermediate_size
    size = {"wq": d * cfg.n_head * hd, "wk": d * cfg.n_kv_head * hd, "wv": d * cfg.n_kv_head * hd,
            "wo": cfg.n_head * hd * d, "w1": d * inner, "w3": d * inner, "w2": inner * d}
    att = 2 * cfg.n_head * hd * seq_len  # one of attention's matmuls, per token

    def trains(name):
        return name not in frozen

    def matmul(weight, input_needs_grad, name):
        """FLOPs of one matmul weight (forward, input gradient, weight gradient) and whether its output needs one."""
        return 2 * weight * (1 + input_needs_grad + trains(name)), input_needs_grad or trains(name)

    flops, x_grad = 0, trains("tok_embeddings.weight")  # x_grad: whether the residual stream needs a gradient
    needs_grad = {}  # (layer, "wq"/"wk"/"wv"): whether that layer's projection output needs a gradient
    for i, computes in enumerate(computed_projections(kv_sources, att_sources)):
        p = f"layers.{i}."
        normed = x_grad or trains(p + "attention_norm.weight")
        for w in ("wq", "wk", "wv"):
            if computes[w[1]]:
                f, needs_grad[i, w] = matmul(size[w], normed, f"{p}attention.{w}.weight")
                flops += f
        # the q, k, v this layer attends with, wherever they were computed
        src = projection_sources(kv_sources, att_sources, i)
        q, k, v = (needs_grad[src[p], f"w{p}"] for p in "qkv")
        flops += 2 * att + att * (v + q + k + (q or k))  # forward; dV, dQ, dK, dP
        f, out_grad = matmul(size["wo"], q or k or v, p + "attention.wo.weight")
        x_grad = x_grad or out_grad
        normed = x_grad or trains(p + "ffn_norm.weight")
        f1, h1 = matmul(size["w1"], normed, p + "feed_forward.w1.weight")
        f3, h3 = matmul(size["w3"], normed, p + "feed_forward.w3.weight")
        f2, out_grad = matmul(size["w2"], h1 or h3, p + "feed_forward.w2.weight")
        flops, x_grad = flops + f + f1 + f3 + f2, x_grad or out_grad
    head = "tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"
    return flops + matmul(d * cfg.vocab_size, x_grad or trains("norm.weight"), head)[0]


def decode_bytes_per_step(cfg, batch_size, context, bytes_per_element):
    """Bytes one decode step reads: every weight once (of the embedding table only the B rows looked up, unless
    the head is tied to it), and each layer's reads of the cache over `context` positions, counted per layer
    as they happen: a V slot (its own, or a K/V consumer's producer's: read again by each reader), and a K slot,
    except an attention consumer, which reads its source's probabilities (B x n_head x context) instead."""
    d, (kv_sources, att_sources) = cfg.n_embd, resolve_sharing(cfg)
    weights = matmul_params(cfg) + (2 * cfg.n_layer + 1) * d + (0 if cfg.tie_embeddings else batch_size * d)
    slot = batch_size * cfg.n_kv_head * context * cfg.head_dim
    probs = batch_size * cfg.n_head * context
    reuses = [projection_sources(kv_sources, att_sources, i)["q"] != i for i in range(cfg.n_layer)]
    cache = sum(slot + (probs if reuse else slot) for reuse in reuses)
    return (weights + cache) * bytes_per_element


def decode_kernels(step, batch, device):
    """The kernels one compiled decode step launches, read from inductor's output code: {"generated": kernels
    inductor wrote (fused C++ on a CPU, Triton on a GPU), "library": calls into library kernels (matmuls, SDPA)}.
    On a GPU each is a launch inside the CUDA graph, so fewer is faster there even where a CPU hides it.
    step: a freshly compiled model whose cache is set up for `batch` sequences, called as step(token, input_pos=)."""
    import re
    from torch._inductor.utils import run_and_get_code
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        _, codes = run_and_get_code(step, token, input_pos=torch.zeros_like(token[0]))
    call = codes[-1][codes[-1].index("def call("):]
    launches = re.findall(r"^\s*(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.[\w.]+)\(",
                          call, re.M)
    generated = sum(name.startswith(("cpp_fused_", "triton_")) for name in launches)
    return {"generated": generated, "library": len(launches) - generated}


def step_flops(model, teacher, seq_len):
    """Model FLOPs per token of a training step, what is really computed: the student's forward and backward
    (frozen weights get no weight gradient, layers below every trained weight no backward) and, when
    distilling, the teacher's forward (a third of a full step's)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return training_flops_per_token(model.config, seq_len, frozen) + (
        training_flops_per_token(teacher.config, seq_len) / 3 if teacher is not None else 0)


# ----------------------------------------------------------------------------------------------------
# The device's limits

PEAK_FLOPS = {  # dense bf16/fp16 tensor-core FLOP/s, vendor datasheets. A key matches a device name that
    # contains each of its *-separated parts (any case); the longest matching key wins.
    "H200*NVL": 835e12, "H200": 989e12, "H100*NVL": 835e12, "H100*PCIe": 756e12, "H100": 989e12, "A100": 312e12,
}
PEAK_BYTES = {  # HBM bytes/s, vendor datasheets, matched the same way
    "H200": 4.8e12, "H100*NVL": 3.9e12, "H100*PCIe": 2.0e12, "H100": 3.35e12, "A100*80GB": 2.04e12,
    "A100": 1.555e12,
}


def datasheet_peak(table, device):
    """(value, key) for a CUDA device named by a key of the table, else (None, None)."""
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    keys = [k for k in table if all(part.lower() in name for part in k.split("*"))]
    key = max(keys, key=len, default=None)
    return (table[key], key.replace("*", " ")) if key else (None, None)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(fn, device, repeats):
    """The seconds of `repeats` timed calls, sorted, after one untimed warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device, dtype, n=None):
    """FLOP/s of an n x n matmul on this device in this dtype, best of a few: the peak where no datasheet
    applies. n=2048 on a CPU (17 GFLOP a matmul, compute-bound, ~1 s in all), 8192 on a GPU."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / timed_seconds(lambda: a @ b, device, repeats=5)[0]  # the best: a peak


@functools.lru_cache(maxsize=None)
def measured_read_bytes(device, mib=None, repeats=21):
    """Bytes/s of reading a buffer far larger than the last-level cache (x.sum()): the median of `repeats`
    reads, as STREAM reports a typical pass. The best of five moved between 50 and 75 GB/s within an hour on a
    2-core cloud machine (a lucky read at a quiet moment); the median of many is what a decode step can expect."""
    mib = mib or (2048 if torch.device(device).type == "cuda" else 512)
    x = torch.ones(mib * 2 ** 20 // 4, device=device)
    return x.nbytes / timed_seconds(x.sum, device, repeats)[repeats // 2]


def device_peak(kind, device, dtype=torch.float32, override=-1):
    """(peak, label) to divide achieved FLOP/s (kind "flops") or bytes/s (kind "bytes") by. A datasheet
    peak for a listed GPU (FLOPs in bf16/fp16 only), else a peak measured once per process on this device.
    override: a given peak; 0 turns the figure off (None, "off"); -1 (default) decides as above."""
    unit = "FLOP/s" if kind == "flops" else "B/s"
    if override == 0:
        return None, "off"
    if override > 0:
        return override, f"given {override / 1e9:,.0f} G{unit}"
    if torch.device(device).type == "cuda":
        half = dtype in (torch.bfloat16, torch.float16)
        value, key = datasheet_peak(PEAK_FLOPS if kind == "flops" else PEAK_BYTES, device)
        if value and (half or kind == "bytes"):
            return value, f"{key} datasheet {str(dtype).split('.')[-1] + ' ' if kind == 'flops' else ''}peak"
    if kind == "flops":
        value = measured_matmul_flops(str(device), dtype)
        return value, f"measured {value / 1e9:,.0f} G{unit} ({str(dtype).split('.')[-1]} matmul)"
    value = measured_read_bytes(str(device))
    return value, f"measured {value / 1e9:,.1f} GB/s (read)"


class Timer:
    """Wall time around a block, waiting for the GPU at both ends."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if "cuda" in device else (lambda: None)

    def __enter__(self):
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t0


def decode_tokens_per_s(step, token, context, n, device):
    """Tokens/s of n decode steps step(token, input_pos=) from position `context` on, after one untimed step."""
    pos = torch.full((1,), context, dtype=torch.long, device=device)
    step(token, input_pos=pos)  # warm-up (allocations)
    with Timer(device) as t:
        for _ in range(n):
            step(token, input_pos=pos)
            pos += 1
    return token.size(0) * n / t.seconds


def device_name(device):
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if "cuda" in device:
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"
