"""Weights in and out: our checkpoints (written atomically and durably, read as data only) and local Hugging
Face LLaMA directories (config.json + safetensors or pytorch_model.bin), each checked with one clear error."""
import contextlib
import json
import os
from dataclasses import fields

import torch

from model import LLaMA, ModelConfig, UsageError, convert_sharing


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


# ----------------------------------------------------------------------------------------------------
# Importing a Hugging Face LLaMA (local directory: config.json + safetensors or pytorch_model.bin)

HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}
HF_LAYER_NAMES = {  # within model.layers.{i}.
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight"}


def our_name(hf_name):
    """Our name for a Hugging Face weight name; a name we do not know is kept, and reported as unexpected."""
    if hf_name.startswith("model.layers."):
        i, _, rest = hf_name[len("model.layers."):].partition(".")
        return f"layers.{i}.{HF_LAYER_NAMES[rest]}" if rest in HF_LAYER_NAMES else hf_name
    return HF_NAMES.get(hf_name, hf_name)


def read_json(file, what):
    """A JSON file, or one clear error naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{file}: {what} is not valid JSON ({e})") from None
    except OSError as e:
        raise UsageError(f"{file}: cannot read {what} ({e.strerror})") from None


def hf_config(path):
    """ModelConfig from a Hugging Face LLaMA config.json; anything this model cannot represent is an error."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UsageError(f"{path}: no config.json (expected a local Hugging Face LLaMA directory)")
    hf = read_json(cfg_path, "config.json")
    if not isinstance(hf, dict):
        raise UsageError(f"{cfg_path}: expected a JSON object of settings")
    arch = hf.get("architectures") or [hf.get("model_type")]
    if not isinstance(arch, list) or "LlamaForCausalLM" not in arch:
        raise UsageError(f"{path}: architecture {arch} is not supported, only LlamaForCausalLM")

    def need(key, kind=int, default=None):
        value = hf.get(key, default)
        if value is None:
            raise UsageError(f"{cfg_path}: lacks {key!r}")
        if kind is int and (type(value) is not int or value < 1):
            raise UsageError(f"{cfg_path}: {key}={value!r}, expected a whole number >= 1")
        if kind is float and (type(value) not in (int, float) or not value > 0):
            raise UsageError(f"{cfg_path}: {key}={value!r}, expected a number > 0")
        return kind(value)

    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers 5 writes rope_parameters
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UsageError(f"{path}: rope scaling {rope} is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise UsageError(f"{path}: biases or an activation other than silu are not supported")
    n_head, n_embd = need("num_attention_heads"), need("hidden_size")
    if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
        raise UsageError(f"{path}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    return ModelConfig(vocab_size=need("vocab_size"), block_size=need("max_position_embeddings", int, 2048),
                       n_layer=need("num_hidden_layers"), n_head=n_head,
                       n_kv_head=need("num_key_value_heads", int, n_head), n_embd=n_embd,
                       intermediate_size=need("intermediate_size"),
                       rope_theta=need("rope_theta", float, rope.get("rope_theta", 10000.0)),
                       norm_eps=need("rms_norm_eps", float, 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings")))


def read_weight_file(file):
    """The tensors of one .safetensors or .bin file; a damaged file or one holding code is an error."""
    if file.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(file)
        except Exception as e:  # safetensors raises its own error type for a truncated or damaged file
            raise UsageError(f"{file} is truncated or not a safetensors file ({str(e).splitlines()[0]})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{file} was refused: not a plain file of tensors ({type(e).__name__}); a .bin that "
                         f"holds code or other objects is never unpickled") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UsageError(f"{file} is not a state dict of tensors")
    return state


def hf_weights(path):
    """All tensors of the checkpoint, from safetensors (one file or an index of shards) or pytorch_model.bin."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(path, index)):
            weight_map = read_json(os.path.join(path, index), "the shard index")
            if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
                raise UsageError(f"{os.path.join(path, index)}: lacks a 'weight_map' object")
            files = sorted(set(map(str, weight_map["weight_map"].values())))
        elif os.path.isfile(os.path.join(path, single)):
            files = [single]
        else:
            continue
        tensors = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise UsageError(f"{path}: the index lists {name}, which is missing")
            tensors.update(read_weight_file(file))
        return tensors
    raise UsageError(f"{path}: no model.safetensors, pytorch_model.bin or an index of their shards")


def load_hf_llama(path, kv_init="keep", **overrides):
    """Load a local Hugging Face LLaMA (e.g. TinyLlama-1.1B). overrides: ModelConfig fields; a kv_share
    or att_share other than 'none' converts the model with convert_sharing(kv_init) after loading."""
    config = hf_config(path)
    specs = {k: overrides.pop(k, "none") for k in ("kv_share", "att_share")}
    config = config_from_dict({**{f.name: getattr(config, f.name) for f in fields(config)}, **overrides})
    model = LLaMA(config)
    state, hf_names = {}, {}
    for hf_name, tensor in hf_weights(path).items():
        if "rotary_emb" in hf_name:
            continue  # recomputed, not learned
        name = our_name(hf_name)
        state[name], hf_names[name] = tensor, hf_name
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    load_weights(model, state, path, hf_names)
    shares = specs != {"kv_share": "none", "att_share": "none"}
    return convert_sharing(model, **specs, kv_init=kv_init) if shares else model
