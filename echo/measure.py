"""What the device can do and how long things take: the peaks MFU and MBU divide by (a datasheet's for a listed
GPU, else measured here, so the figures mean the same on any machine), timers, the generation and decode rates
bench.py reports, and the kernels a compiled decode step launches. The counts they are divided into are costs.py's."""
import functools
import platform
import time

import torch

from echo.generate import cache_len, compile_decode_step, generate_tokens

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


@torch.no_grad()
def generation_tokens_per_s(model, prompt, n, compiled=False):
    """(prefill tokens/s, cached decode tokens/s) of generating n tokens after a (B, T) prompt, as sample.py
    generates: a compiled decode step (its CUDA graph recorded) and an untimed warm-up on the same cache first."""
    step = compile_decode_step(model, prompt.size(0), cache_len(model, prompt.size(1), n)) if compiled else None
    for _ in zip(range(3), generate_tokens(model, prompt, n, temperature=0, step=step)):  # warm-up
        pass
    tokens, device = generate_tokens(model, prompt, n, temperature=0, step=step), str(prompt.device)
    with Timer(device) as prefill:
        next(tokens)
    with Timer(device) as decode:
        for _ in tokens:
            pass
    return prompt.numel() / prefill.seconds, prompt.size(0) * (n - 1) / decode.seconds


@torch.no_grad()
def decode_tokens_per_s_at(model, batch, context, n, compiled=False):
    """Decode tokens/s with `context` positions already in the cache. No prefill is run: every step attends
    over the whole cache (masked), so its work and bytes depend on the cache's length, not its values."""
    device = model.tok_embeddings.weight.device
    step = compile_decode_step(model, batch, context + n) if compiled else model
    model.setup_cache(batch, context + n)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    return decode_tokens_per_s(step, token, context, n, str(device))


@torch.no_grad()
def naive_decode_tokens_per_s(model, prompt, n):
    """Tokens/s at batch 1 when each new token recomputes the whole context (how nanoGPT samples)."""
    with Timer(str(prompt.device)) as t:
        for _ in range(n):
            prompt = torch.cat((prompt, model(prompt)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    return n / t.seconds


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
