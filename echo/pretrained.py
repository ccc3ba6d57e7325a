"""Weights from elsewhere: a local Hugging Face LLaMA directory (config.json + safetensors or pytorch_model.bin)
or a GGUF file (llama.cpp's format: metadata, tokenizer and possibly quantized weights in one file), read into
an LLaMA and converted to sharing if asked; the GGUF file's tokenizer as a dataset meta; and load_pretrained,
which names any model a run can start from: ckpt:DIR (ours), hf:DIR or gguf:FILE."""
import functools
import os
from dataclasses import fields

import numpy as np
import torch

from echo.checkpoint import config_from_dict, load_checkpoint, load_weights, model_from_checkpoint, same_tokens
from configurator import read_json
from echo.conversion import convert_sharing
from model import LLaMA, ModelConfig, UsageError

IMPORTS = ("hf:", "gguf:")  # how the scripts name a pretrained model: hf:DIR or gguf:FILE


def load_pretrained(source, meta, dataset):
    """The model that ckpt:DIR, hf:DIR or gguf:FILE names, checked to read the tokens of `dataset` (meta)."""
    if source.startswith("ckpt:"):
        path = os.path.join(source[5:], "ckpt.pt")
        ckpt = load_checkpoint(path, require=("meta",))
        if not isinstance(ckpt["meta"], dict) or not same_tokens(ckpt["meta"], meta):
            raise UsageError(f"{source} was trained on other tokens than dataset '{dataset}'")
        return model_from_checkpoint(ckpt, path)
    model = import_pretrained(source)
    if meta["tokenizer"] != "hf" or meta["vocab_size"] > model.config.vocab_size:
        raise UsageError(f"dataset '{dataset}' is not tokenized for {source}: prepare it with --tokenizer={source}")
    return model


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


def our_name(name, top_names, layer_names, layer_prefix):
    """Our name for a weight's name in a Hugging Face (layer_prefix "model.layers.") or GGUF ("blk.") file;
    a name we do not know is kept, and reported as unexpected."""
    if name.startswith(layer_prefix):
        i, _, rest = name[len(layer_prefix):].partition(".")
        return f"layers.{i}.{layer_names[rest]}" if rest in layer_names else name
    return top_names.get(name, name)


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


def import_pretrained(source, kv_init="keep", **overrides):
    """The model that 'hf:DIR' (a Hugging Face LLaMA directory) or 'gguf:FILE' (a GGUF file, or a folder
    holding one) names; overrides as in load_hf_llama."""
    kind, _, path = source.partition(":")
    return (load_gguf_llama if kind == "gguf" else load_hf_llama)(path, kv_init, **overrides)


def from_pretrained(path, kv_init="keep", **overrides):
    """A local Hugging Face LLaMA directory, or a GGUF file (a .gguf, or a folder holding one), as an LLaMA,
    converted if overrides name a kv_share or att_share:
        model = from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", att_share="echo:7")"""
    return (load_gguf_llama if is_gguf(path) else load_hf_llama)(path, kv_init, **overrides)


def load_hf_llama(path, kv_init="keep", **overrides):
    """Load a local Hugging Face LLaMA (e.g. TinyLlama-1.1B). overrides: ModelConfig fields; a kv_share
    or att_share other than 'none' converts the model with convert_sharing(kv_init) after loading."""
    config, state, hf_names = hf_config(path), {}, {}
    for hf_name, tensor in hf_weights(path).items():
        if "rotary_emb" in hf_name:
            continue  # recomputed, not learned
        name = our_name(hf_name, HF_NAMES, HF_LAYER_NAMES, "model.layers.")
        state[name], hf_names[name] = tensor, hf_name
    return pretrained_model(config, state, hf_names, path, kv_init, overrides)


def pretrained_model(config, state, source_names, where, kv_init, overrides):
    """The imported model: config with overrides applied, the weights checked and loaded (a tied head reads
    the embedding), then converted to the kv_share / att_share the overrides name, if any."""
    specs = {k: overrides.pop(k, "none") for k in ("kv_share", "att_share")}
    config = config_from_dict({**{f.name: getattr(config, f.name) for f in fields(config)}, **overrides})
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    model = load_weights(LLaMA(config), state, where, source_names)
    shares = specs != {"kv_share": "none", "att_share": "none"}
    return convert_sharing(model, **specs, kv_init=kv_init) if shares else model


# ----------------------------------------------------------------------------------------------------
# Importing a GGUF file (llama.cpp's format: metadata, tokenizer and possibly quantized weights in one file),
# read with the gguf package, llama.cpp's own Python reader

GGUF_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
GGUF_LAYER_NAMES = {  # within blk.{i}.
    "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight"}
GGUF_CONTROL_TOKEN = 3  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
GGUF_PRE_TOKENIZERS = ("default", "gpt-2", "smollm")  # smollm: each digit its own piece, then GPT-2's split


def is_gguf(path):
    """A .gguf file, or a folder with a .gguf file and no config.json (a Hugging Face directory has one)."""
    if os.path.isdir(path):
        return not os.path.isfile(os.path.join(path, "config.json")) and any(f.endswith(".gguf") for f in os.listdir(path))
    return path.endswith(".gguf")


def gguf_file(path):
    """The .gguf file that path names: the file itself, or the one .gguf file in a folder."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(found) != 1:
            raise UsageError(f"{path}: expected one .gguf file in the folder, found {len(found) or 'none'}"
                             + (f" ({', '.join(found)}): name the file" if found else ""))
        return os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such GGUF file")
    return path


def open_gguf(path):
    """(file, GGUFReader) for a GGUF file that holds a LLaMA; anything else is one clear error."""
    file = gguf_file(path)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UsageError("reading a .gguf file needs the gguf package: pip install gguf") from None
    try:
        stat = os.stat(file)
        reader = read_gguf(os.path.realpath(file), stat.st_size, stat.st_mtime_ns)
    except Exception as e:  # bad magic, truncated header or tensor data: the reader raises several types
        raise UsageError(f"{file} is truncated or not a GGUF file ({str(e).splitlines()[0][:120]})") from None
    arch = gguf_value(reader, "general.architecture", str)
    if arch != "llama":
        raise UsageError(f"{file}: architecture {arch!r} is not supported, only 'llama'")
    return file, reader


@functools.lru_cache(maxsize=4)
def read_gguf(file, size, mtime_ns):
    """The file's GGUFReader, read once per process for as long as its size and time stay: parsing the fields
    of a 49k-token vocabulary takes seconds, and loading a model reads both its weights and its tokenizer."""
    from gguf import GGUFReader
    return GGUFReader(file)


def gguf_field(reader, key):
    """A metadata value as Python data (a number, a string, a list), or None if the file lacks it."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_value(reader, key, kind, default=None):
    """One metadata value of the given Python type; missing (without a default) or mistyped is an error."""
    value = gguf_field(reader, key)
    if value is None:
        if default is None:
            raise UsageError(f"{reader.data.filename}: lacks the metadata {key!r}")
        return default
    if kind is float and type(value) in (int, float):  # stored as float32: its shortest decimal, 1e-05 not 9.99e-06
        value = float(str(np.float32(value)))
    if type(value) is not kind or (kind in (int, float) and not value > 0):
        raise UsageError(f"{reader.data.filename}: metadata {key}={str(value)[:60]!r}, expected "
                         f"{'a positive ' if kind in (int, float) else ''}{kind.__name__}")
    return value


def gguf_config(reader, tensor_names):
    """ModelConfig from the llama.* metadata; what this model cannot represent (rope scaling, a head size
    other than n_embd / n_head, per-layer head counts) is an error."""
    file = reader.data.filename
    n_embd, n_head = gguf_value(reader, "llama.embedding_length", int), gguf_value(reader, "llama.attention.head_count", int)
    head_dim = n_embd // n_head
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if gguf_value(reader, key, int, head_dim) != head_dim:
            raise UsageError(f"{file}: {key}={gguf_value(reader, key, int)} differs from embedding_length / "
                             f"head_count = {head_dim}: not supported")
    scaling = gguf_value(reader, "llama.rope.scaling.type", str, "none")
    if scaling != "none":
        raise UsageError(f"{file}: rope scaling {scaling!r} is not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")  # older files state the vocabulary only as a token list
    vocab = gguf_value(reader, "llama.vocab_size", int, len(tokens.data) if tokens else None)
    return ModelConfig(vocab_size=vocab,
                       block_size=gguf_value(reader, "llama.context_length", int, 2048),
                       n_layer=gguf_value(reader, "llama.block_count", int), n_head=n_head,
                       n_kv_head=gguf_value(reader, "llama.attention.head_count_kv", int, n_head), n_embd=n_embd,
                       intermediate_size=gguf_value(reader, "llama.feed_forward_length", int),
                       rope_theta=gguf_value(reader, "llama.rope.freq_base", float, 10000.0),
                       norm_eps=gguf_value(reader, "llama.attention.layer_norm_rms_epsilon", float, 1e-5),
                       tie_embeddings="output.weight" not in tensor_names)


def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's converter for attn_q / attn_k: it reorders each head's rows so that rotary pairs are
    adjacent (rows 2j, 2j+1), where our RoPE (Hugging Face's) pairs row j with row j + head_dim/2.
    Without this the shapes fit and every logit is wrong. w: (n_heads * head_dim, in)."""
    out, cols = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def load_gguf_llama(path, kv_init="keep", **overrides):
    """Load a LLaMA from a GGUF file (e.g. SmolLM2-135M): every tensor type the gguf package can dequantize
    (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants, ...) becomes fp32; overrides as in load_hf_llama."""
    from gguf.quants import dequantize
    file, reader = open_gguf(path)
    config = gguf_config(reader, {t.name for t in reader.tensors})
    state, gguf_names = {}, {}
    for t in reader.tensors:
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError) as e:
            raise UsageError(f"{file}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                             f"cannot dequantize ({str(e).splitlines()[0][:80]})") from None
        if t.name.endswith(("attn_q.weight", "attn_k.weight")) and w.ndim == 2:
            w = unpermute_rope_rows(w, config.n_head if "attn_q" in t.name else config.n_kv_head)
        name = our_name(t.name, GGUF_NAMES, GGUF_LAYER_NAMES, "blk.")
        state[name], gguf_names[name] = torch.from_numpy(w.copy()), t.name
    return pretrained_model(config, state, gguf_names, file, kv_init, overrides)


def gguf_meta(path):
    """The dataset meta of a GGUF file's tokenizer (tokenizer.ggml.*), built as a Hugging Face tokenizer so
    that it is stored, compared and rebuilt like an imported tokenizer.json. Only byte-level BPE (the "gpt2"
    tokenizer model) is supported; BOS is added to each document only if the metadata says so."""
    file, reader = open_gguf(path)
    model = gguf_value(reader, "tokenizer.ggml.model", str)
    if model != "gpt2":
        raise UsageError(f"{file}: tokenizer model {model!r} is not supported, only 'gpt2' (byte-level BPE)")
    pre = gguf_value(reader, "tokenizer.ggml.pre", str, "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise UsageError(f"{file}: pre-tokenizer {pre!r} is not supported ({', '.join(GGUF_PRE_TOKENIZERS)})")
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise UsageError("a GGUF tokenizer needs the tokenizers package: pip install tokenizers") from None
    tokens, merges = gguf_field(reader, "tokenizer.ggml.tokens") or [], gguf_field(reader, "tokenizer.ggml.merges") or []
    kinds = gguf_field(reader, "tokenizer.ggml.token_type") or []
    if not tokens or not merges or len(kinds) not in (0, len(tokens)):
        raise UsageError(f"{file}: the tokenizer lacks its tokens or merges, or its token types do not match them")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tok = Tokenizer(bpe)
    pieces = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3, e.g. <|im_start|>) are never split into pieces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, kinds) if kind == GGUF_CONTROL_TOKEN])
    add_bos = gguf_value(reader, "tokenizer.ggml.add_bos_token", bool, False)
    bos, eos = gguf_field(reader, "tokenizer.ggml.bos_token_id"), gguf_field(reader, "tokenizer.ggml.eos_token_id")
    # generation stops at the end-of-sequence token, and at end-of-turn / end-of-message ones where present
    stop = [gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return {"tokenizer": "hf", "vocab_size": tok.get_vocab_size(), "bos": bos if add_bos else None, "eot": eos,
            "tokenizer_json": tok.to_str(), "stop": sorted({int(t) for t in stop if t is not None}),
            "chat_template": gguf_field(reader, "tokenizer.chat_template"),
            "chat_tokens": {"bos_token": tokens[bos] if bos is not None else "",
                            "eos_token": tokens[eos] if eos is not None else ""}}

