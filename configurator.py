"""Settings in one place: the device and dtype defaults (decided once, here), nanoGPT-style configuration
(`script.py [config_file.py ...] [--key=value ...]`), the checks that turn a device or dtype this machine
cannot run into one clear line, and reading a JSON file the same way. Every script reads its settings here."""
import ast
import contextlib
import ctypes
import difflib
import json
import os
import sys
import types
from dataclasses import fields

import torch

from model import UsageError

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
COMPILE = CUDA  # compiling pays off on a GPU; on a CPU only over a long run (its first steps take minutes)


def default_dtype(cuda=CUDA, capabilities=None):
    """(dtype, why) for runs that do not say: bf16 where the matrix units have it, else fp32 (fp16 would need a
    GradScaler). On a CPU that means bf16 dot products in hardware, AMX or AVX512-BF16: measured 4x the fp32
    matmul rate on the AMD EPYC with AVX512-BF16 here and 7-8x on a Xeon with AMX (docs/RESULTS.md); without them
    bf16 is emulated, slower than fp32."""
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU has bf16"
        return "float32", "the GPU has no bf16"
    caps = capabilities if capabilities is not None else getattr(torch.cpu, "get_capabilities", dict)()
    units = [name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)]
    if units:
        return "bfloat16", f"the CPU has bf16 dot products in hardware ({', '.join(units)})"
    return "float32", "the CPU has no bf16 dot products in hardware (AMX, AVX512-BF16): bf16 would be emulated"


DTYPE, DTYPE_WHY = default_dtype()


def configure(cfg, argv):
    """nanoGPT-style settings: `script.py [config_file.py ...] [--key=value ...]`, applied in order; a bare
    `--flag` means `--flag=True`. Unknown keys and values of the wrong type are errors, named in one line; a key
    the settings class lists in RENAMED ({old key: what says it now}) names its replacement. cfg.explicit records
    the keys that were set, so a resume can tell a request from a default."""
    types_of = {f.name: type(getattr(cfg, f.name)) for f in fields(cfg)}
    renamed = getattr(type(cfg), "RENAMED", {})
    cfg.explicit = set()

    def assign(key, value, where):
        if key in renamed:
            raise UsageError(f"{key} in {where} is no longer a setting: {renamed[key]}")
        if key not in types_of:
            near = difflib.get_close_matches(key, types_of, n=1)
            raise UsageError(f"unknown config key '{key}' in {where}" + (f" (did you mean '{near[0]}'?)" if near else ""))
        want = types_of[key]
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise UsageError(f"{key}={value!r} in {where}: expected {want.__name__}, got {type(value).__name__}")
        setattr(cfg, key, value)
        cfg.explicit.add(key)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                if key in types_of and types_of[key] is not bool:
                    raise UsageError(f"argument '{arg}': expected --key=value ({key} needs a value of type "
                                     f"{types_of[key].__name__})")
                raw = "True"  # a bare --flag; an unknown key is reported by assign
            try:
                value = raw if types_of.get(key) is str else ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # not a Python literal: keep the text, the type check decides
            assign(key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise UsageError(f"config file '{arg}' not found")
            namespace = {}
            with open(arg) as f:
                exec(f.read(), namespace)  # config files are trusted Python, as in nanoGPT
            for key, value in namespace.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    assign(key, value, arg)
    return cfg


def read_json(file, what):
    """A JSON file, or one clear error naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{file}: {what} is not valid JSON ({e})") from None
    except OSError as e:
        raise UsageError(f"{file}: cannot read {what} ({e.strerror})") from None


def check_device(device):
    """One clear line for a device this machine does not have."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"device={device!r}: expected cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={device!r}, but this machine has no CUDA GPU that torch can use: use --device=cpu")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise UsageError(f"device={device!r}, but there are only {torch.cuda.device_count()} GPUs")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device={device!r}, but MPS (Apple GPU) is not available here: use --device=cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device={device!r}: expected cpu, cuda, cuda:N or mps")


def precision(device, dtype):
    """(torch dtype, autocast context) for a dtype name; float32 runs without autocast."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
    ptdtype = getattr(torch, dtype)
    device_type = torch.device(device).type
    return ptdtype, (contextlib.nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype))


def keep_freed_memory(device):
    """On a CPU under Linux's glibc, keep freed memory in the process for the next allocation. By default glibc
    maps every block over 32 MB (a weight's gradient, the logits' gradient, a large batch's activations) on its
    own and unmaps it when freed, so each training step page-faults its large tensors in anew: a SmolLM2
    conversion step ran 1.27x faster without that, for 5% more peak memory (docs/RESULTS.md). Elsewhere (a GPU,
    another C library) it does nothing. Returns whether it took effect."""
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def run_main(main, *args):
    """Run a script's main: bad input ends in one line naming the problem and exit code 1, never a traceback."""
    try:
        return main(*args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a folder that cannot be written, a full disk
        sys.exit(f"error: {e.strerror or e}: {e.filename or ''}")
