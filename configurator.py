"""Settings in one place: the device and dtype defaults (decided once, here), nanoGPT-style configuration
(`script.py [config_file.py ...] [--key=value ...]`), the checks that turn a device or dtype this machine
cannot run into one clear line, and reading a JSON file the same way. Every script reads its settings here."""
import ast
import contextlib
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
DTYPE = "bfloat16" if CUDA and torch.cuda.is_bf16_supported() else "float32"  # fp16 would need a GradScaler
COMPILE = CUDA  # compiling pays off on a GPU; on a CPU the first steps' compile time rarely comes back


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


def run_main(main, *args):
    """Run a script's main: bad input ends in one line naming the problem and exit code 1, never a traceback."""
    try:
        return main(*args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a folder that cannot be written, a full disk
        sys.exit(f"error: {e.strerror or e}: {e.filename or ''}")
