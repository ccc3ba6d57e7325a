"""This project's checkpoints, each read checked with one clear error: written atomically and durably, read as
data only (weights_only), and what an exact resume needs besides the weights (optimizer, GradScaler, every
RNG), checked when a run resumes. Weights from elsewhere (Hugging Face directories, GGUF files) are pretrained.py's."""
import contextlib
import os
from dataclasses import fields

import torch

from model import LLaMA, ModelConfig, UsageError


def config_from_dict(d):
    """A config from a dict (a checkpoint's model_args): unknown keys and wrong types are errors."""
    if not isinstance(d, dict):
        raise UsageError(f"model config must be a dict of settings, got {type(d).__name__} {d!r:.40}")
    types = {f.name: type(f.default) for f in fields(ModelConfig)}
    unknown = set(d) - set(types)
    if unknown:
        raise UsageError(f"unknown model config key(s): {', '.join(sorted(map(str, unknown)))}")
    for k, v in d.items():
        if not (type(v) is types[k] or (types[k] is float and type(v) is int)):
            raise UsageError(f"model config {k}={v!r}: expected {types[k].__name__}, got {type(v).__name__}")
    return ModelConfig(**d)


def save_checkpoint(path, checkpoint):
    """Write to a temp file, fsync it, rename it over the old one, fsync the folder: a crash or power loss
    at any point leaves either the previous checkpoint or the new one, never a partial or empty file.
    A failed write (disk full, read-only folder) is one clear error and the previous checkpoint stays."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UsageError(f"could not write checkpoint {path} ({reason}); "
                         f"the previous checkpoint, if any, is intact") from None


def load_checkpoint(path, map_location="cpu", require=()):
    """A train.py checkpoint, read as data only (weights_only: no pickled code runs). require: the keys
    the caller needs beyond model and model_args, e.g. the optimizer state for a resume."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: train one with train.py or check --out_dir")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= set(ckpt):
        raise UsageError(f"checkpoint {path} lacks 'model' or 'model_args': not written by train.py")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise UsageError(f"checkpoint {path} lacks {', '.join(map(repr, missing))}: it cannot be resumed "
                         f"(fine-tune from it instead with init_from=ckpt:DIR)")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(t, torch.Tensor) for t in ckpt["model"].values()):
        raise UsageError(f"checkpoint {path}: 'model' is not a state dict of tensors")
    return ckpt


def load_weights(model, state, where, source_names=None):
    """load_state_dict, with an error that names the first missing, unexpected or misshapen weight
    (by its name in the source, if source_names maps ours to it)."""
    show = (source_names or {}).get
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        first = (f"missing {missing[0]}" if missing else f"unexpected {show(unexpected[0], unexpected[0])}"
                 if unexpected else f"{show(shapes[0], shapes[0])} has shape {tuple(state[shapes[0]].shape)}, "
                 f"the config implies {tuple(expected[shapes[0]].shape)}")
        n = len(missing) + len(unexpected) + len(shapes)
        raise UsageError(f"{where}: weights do not match the model config: {first}"
                         + (f" (and {n - 1} more)" if n > 1 else ""))
    bad = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad:
        raise UsageError(f"{where}: weight {show(bad, bad)} has NaN or infinite values")
    model.load_state_dict(state)
    return model


def model_from_checkpoint(ckpt, where="checkpoint"):
    return load_weights(LLaMA(config_from_dict(ckpt["model_args"])), ckpt["model"], where)


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


def restore_training_state(ckpt, optimizer, scaler, rank, world, device, mismatch):
    """A resume: the optimizer and GradScaler state, and this rank's RNG states, as the checkpoint has them.
    mismatch: the error to give when the optimizer state does not fit the model."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"{mismatch} ({str(e).splitlines()[0]})") from None
    states = ckpt["rng_states"]  # one per rank
    if len(states) != world and rank == 0:
        print(f"note: the run was saved with {len(states)} process(es), resumed with {world}: "
              f"dropout streams differ from an uninterrupted run")
    if rank < len(states):
        set_rng_state(states[rank], device)


def same_tokens(a, b):
    """Whether two data metas describe the same tokenizer (so a model trained on one reads the other)."""
    return all(a.get(k) == b.get(k) for k in ("tokenizer", "vocab_size", "itos", "tokenizer_json"))


# ----------------------------------------------------------------------------------------------------
# Resuming a run: what train.py needs from its own checkpoint

RUN_SETTINGS = ("kv_share_target", "att_share_target", "adapt_iters", "trainable", "kv_init",  # schedule and
                "distill_alpha", "distill_hidden", "distill_hidden_at", "distill_temperature", "distill_from")  # teacher


def resume_checkpoint(cfg, meta, path):
    """The checkpoint at `path` that train.py's settings `cfg` resume, checked: all an exact resume needs, of the
    right types, trained on the tokens of `meta`; the run's schedule settings (RUN_SETTINGS) are restored from it
    into cfg (a different value given explicitly is an error: it would silently change a half-finished
    conversion; a checkpoint older than a setting has its default, the class's)."""
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
    config = dict(ckpt["config"])
    if config.get("adapt_freeze") and config.get("trainable", "all") == "all":  # written before `trainable` said it
        config["trainable"] = "stages:layers"
    for key in RUN_SETTINGS:
        saved = config.get(key, getattr(type(cfg), key))
        if key in cfg.explicit and getattr(cfg, key) != saved:
            raise UsageError(f"{key}={getattr(cfg, key)!r}, but the run being resumed has {key}={saved!r}: a "
                             f"resumed run keeps its conversion schedule (start a new out_dir to change it)")
        setattr(cfg, key, saved)
    return ckpt
