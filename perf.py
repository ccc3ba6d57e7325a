"""MFU and MBU: what a step computes or reads, over the device's limit. MFU = step_flops x tokens/s / peak
FLOP/s (training is compute-bound: against a matmul peak); MBU = decode bytes/s / peak bytes/s (batch-1
decode is bandwidth-bound: against a memory peak). The peak is a datasheet's for a listed GPU, else measured
here, so the figures mean the same on any machine. The per-token counts themselves are model.py's
(training_flops_per_token, decode_bytes_per_step)."""
import functools
import time

import torch

from model import training_flops_per_token


def step_flops(model, teacher, seq_len):
    """Model FLOPs per token of a training step, what is really computed: the student's forward and backward
    (frozen weights get no weight gradient, layers below every trained weight no backward) and, when
    distilling, the teacher's forward (a third of a full step's)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return training_flops_per_token(model.config, seq_len, frozen) + (
        training_flops_per_token(teacher.config, seq_len) / 3 if teacher is not None else 0)

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


def best_seconds(fn, device, repeats):
    """Fastest of `repeats` timed calls after one untimed warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device, dtype, n=None):
    """FLOP/s of an n x n matmul on this device in this dtype, best of a few: the peak where no datasheet
    applies. n=2048 on a CPU (17 GFLOP a matmul, compute-bound, ~1 s in all), 8192 on a GPU."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / best_seconds(lambda: a @ b, device, repeats=5)


@functools.lru_cache(maxsize=None)
def measured_read_bytes(device, mib=None):
    """Bytes/s of reading a buffer far larger than the last-level cache (x.sum()), best of a few."""
    mib = mib or (2048 if torch.device(device).type == "cuda" else 512)
    x = torch.ones(mib * 2 ** 20 // 4, device=device)
    return x.nbytes / best_seconds(x.sum, device, repeats=5)


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
