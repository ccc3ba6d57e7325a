"""Every bad input gets one clear line: each case runs a real script as a user would (its `__main__`, its argv)
and asserts exit code 1, no traceback, and a last line `error: ...` that names the problem. Most cases run the
script in this process (runpy: the same code path, without a second torch import per case); a few, one per kind
of entry point, run as real subprocesses, so that the exit code and stderr of the process itself stay tested."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from echo.pretrained import HF_LAYER_NAMES, HF_NAMES
from conftest import ROOT, bpe_tokenizer, run, run_script, tiny_args, write_gguf
from model import LLaMA, ModelConfig


def hf_dir_from(model, path, **config_changes):
    """Save one of our models as a local Hugging Face LLaMA directory (safetensors), without transformers."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    c = model.config
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
              "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
              "intermediate_size": c.intermediate_size, "max_position_embeddings": c.block_size,
              "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": False}
    config.update(config_changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    state = {}
    top, layer = {v: k for k, v in HF_NAMES.items()}, {v: k for k, v in HF_LAYER_NAMES.items()}
    for name, tensor in model.state_dict().items():
        i, _, rest = name.partition(".")[2].partition(".")
        hf = f"model.layers.{i}.{layer[rest]}" if name.startswith("layers.") else top[name]
        state[hf] = tensor.contiguous()
    save_file(state, os.path.join(path, "model.safetensors"))
    return path


class Pickled:
    """A malicious object: unpickling it would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def build_world(root, data_dir):
    """Every file the cases need: datasets, checkpoints and HF directories, good and damaged."""
    w = {"root": str(root), "data": data_dir}
    good = root / "good"
    run(data_dir, good, max_iters=4, n_layer=2, eval_interval=2)
    w["good"] = str(good)
    ckpt = torch.load(good / "ckpt.pt", weights_only=True)

    def ckpt_variant(name, change):
        d = root / name
        os.makedirs(d)
        c = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt.items()}
        change(c)
        torch.save(c, d / "ckpt.pt")
        w[name] = str(d)

    ckpt_variant("no_optimizer", lambda c: c.pop("optimizer"))
    ckpt_variant("no_iter", lambda c: c.pop("iter_num"))
    ckpt_variant("no_rng", lambda c: c.pop("rng_states"))
    ckpt_variant("iter_str", lambda c: c.update(iter_num="4"))
    ckpt_variant("args_str", lambda c: c.update(model_args="hello"))
    ckpt_variant("args_type", lambda c: c["model_args"].update(n_layer="2"))
    ckpt_variant("nan", lambda c: c["model"].update({"norm.weight": torch.full_like(c["model"]["norm.weight"], float("nan"))}))
    ckpt_variant("missing_key", lambda c: c["model"].pop("layers.1.attention.wq.weight"))
    ckpt_variant("extra_key", lambda c: c["model"].update({"layers.9.attention.wq.weight": torch.zeros(2)}))
    ckpt_variant("bad_shape", lambda c: c["model"].update({"norm.weight": torch.zeros(5)}))
    ckpt_variant("no_meta", lambda c: c.pop("meta"))
    ckpt_variant("bad_tokenizer", lambda c: c.update(meta={"tokenizer": "sentencepiece", "vocab_size": 30}))
    ckpt_variant("char_no_itos", lambda c: c.update(meta={"tokenizer": "char", "vocab_size": 30}))
    ckpt_variant("model_list", lambda c: c.update(model=[1, 2]))

    def wider_vocab(c):  # the same tokens, but a model with 12 more (padding) rows in its vocabulary
        c["model_args"]["vocab_size"] += 12
        for k in ("tok_embeddings.weight", "output.weight"):
            c["model"][k] = torch.cat([c["model"][k], torch.zeros(12, c["model"][k].size(1))])
    ckpt_variant("wide_vocab", wider_vocab)
    os.makedirs(root / "corrupt")
    (root / "corrupt" / "ckpt.pt").write_bytes(b"\x80\x02 not a checkpoint")
    w["corrupt"] = str(root / "corrupt")
    w["marker"] = str(root / "PWNED")
    os.makedirs(root / "evil_ckpt")
    torch.save({"model": Pickled(w["marker"]), "model_args": {}}, root / "evil_ckpt" / "ckpt.pt")
    w["evil_ckpt"] = str(root / "evil_ckpt")

    # datasets: copies of the good one, each broken one way
    def data_variant(name, change):
        d = root / "datasets" / name
        shutil.copytree(os.path.join(data_dir, "tiny"), d)
        change(d)

    def write(d, file, content):
        (d / file).write_bytes(content if isinstance(content, bytes) else content.encode())

    meta = json.loads(open(os.path.join(data_dir, "tiny", "meta.json")).read())
    data_variant("meta_not_json", lambda d: write(d, "meta.json", "{not json"))
    data_variant("meta_list", lambda d: write(d, "meta.json", "[1, 2]"))
    data_variant("meta_no_vocab", lambda d: write(d, "meta.json", json.dumps({"tokenizer": "char", "dtype": "uint16"})))
    data_variant("meta_dtype", lambda d: write(d, "meta.json", json.dumps(dict(meta, dtype="float64"))))
    data_variant("no_train", lambda d: os.remove(d / "train.bin"))
    data_variant("no_val", lambda d: os.remove(d / "val.bin"))
    data_variant("empty_train", lambda d: write(d, "train.bin", b""))
    data_variant("odd_train", lambda d: write(d, "train.bin", (d / "train.bin").read_bytes() + b"\x01"))
    data_variant("big_ids", lambda d: write(d, "val.bin", np.full(500, 300, dtype=np.uint16).tobytes()))
    data_variant("short_val", lambda d: write(d, "val.bin", np.zeros(10, dtype=np.uint16).tobytes()))
    other = dict(meta, itos=meta["itos"][::-1])
    data_variant("other_tokens", lambda d: write(d, "meta.json", json.dumps(other)))
    w["datasets"] = str(root / "datasets")

    # Hugging Face directories
    torch.manual_seed(0)
    small = LLaMA(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                              tie_embeddings=False))
    w["hf_good"] = hf_dir_from(small, root / "hf_good")

    def hf_variant(name, change, **config_changes):
        d = hf_dir_from(small, root / name, **config_changes)
        change(d)
        w[name] = d

    nothing = lambda d: None  # noqa: E731
    hf_variant("hf_cfg_not_json", lambda d: write(root / "hf_cfg_not_json", "config.json", "{oops"))
    hf_variant("hf_no_hidden", lambda d: write(root / "hf_no_hidden", "config.json", json.dumps(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 40})))
    hf_variant("hf_hidden_str", nothing, hidden_size="16")
    hf_variant("hf_kv0", nothing, num_key_value_heads=0)
    hf_variant("hf_truncated", lambda d: write(root / "hf_truncated", "model.safetensors",
                                               (root / "hf_truncated" / "model.safetensors").read_bytes()[:300]))
    hf_variant("hf_index_not_json", lambda d: write(root / "hf_index_not_json", "model.safetensors.index.json", "[["))
    hf_variant("hf_index_missing_shard", lambda d: write(root / "hf_index_missing_shard", "model.safetensors.index.json",
                                                         json.dumps({"weight_map": {"a": "shard-1.safetensors"}})))
    hf_variant("hf_no_weights", lambda d: os.remove(root / "hf_no_weights" / "model.safetensors"))
    hf_variant("hf_tok_not_json", lambda d: write(root / "hf_tok_not_json", "tokenizer.json", "{not a tokenizer"))

    def evil_bin(d):
        os.remove(os.path.join(d, "model.safetensors"))
        torch.save({"model.embed_tokens.weight": Pickled(w["marker"])}, os.path.join(d, "pytorch_model.bin"))
    hf_variant("hf_evil_bin", evil_bin)

    # GGUF files: a good one (with its tokenizer), and each way one can be wrong
    tok = bpe_tokenizer()
    gguf_model = LLaMA(ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))

    def gguf_variant(name, **kw):
        os.makedirs(root / name)
        write_gguf(root / name / "m.gguf", gguf_model, tokenizer=tok, **kw)
        w[name] = str(root / name / "m.gguf")

    gguf_variant("gguf_good")
    gguf_variant("gguf_arch", arch="gpt2")
    gguf_variant("gguf_spm", tokenizer_model="llama")
    gguf_variant("gguf_pre", pre="qwen2")
    gguf_variant("gguf_no_heads", drop=("head_count",))
    gguf_variant("gguf_i32", qtype="I32", encode=lambda a, kind: a.astype(np.int32))
    gguf_variant("gguf_truncated")
    (root / "gguf_truncated" / "m.gguf").write_bytes((root / "gguf_truncated" / "m.gguf").read_bytes()[:5000])
    os.makedirs(root / "gguf_not")
    write(root / "gguf_not", "m.gguf", "not a GGUF file at all\n" * 10)
    w["gguf_not"] = str(root / "gguf_not" / "m.gguf")
    gguf_variant("gguf_two")
    shutil.copy(root / "gguf_two" / "m.gguf", root / "gguf_two" / "n.gguf")
    w["gguf_two"] = str(root / "gguf_two")

    # files for prepare.py and prompts
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (root / "one_char.txt").write_text("a")
    (root / "a_file").write_text("not a folder")
    w["latin1"], w["one_char"], w["a_file"] = str(root / "latin1.txt"), str(root / "one_char.txt"), str(root / "a_file")
    return w


def T(**kw):
    """train.py on the tiny dataset, with kw overriding the tiny settings."""
    return lambda w: ["train.py", *tiny_args(w["data"], os.path.join(w["root"], "out-" + "-".join(kw)), **kw)]


def T_data(dataset, **kw):
    return lambda w: ["train.py", *tiny_args(w["datasets"], os.path.join(w["root"], "out-d-" + dataset),
                                             dataset=dataset, **kw)]


def T_resume(name, **kw):
    return lambda w: ["train.py", *tiny_args(w["data"], w[name], init_from="resume", **kw)]


def S(*args, ckpt="good"):
    return lambda w: ["sample.py", f"--out_dir={w[ckpt]}", "--device=cpu", "--max_new_tokens=4", *args]


def S_hf(name):
    return lambda w: ["sample.py", f"--init_from=hf:{w[name]}", "--device=cpu", "--max_new_tokens=4"]


def S_gguf(name):
    return lambda w: ["sample.py", f"--init_from=gguf:{w[name]}", "--device=cpu", "--max_new_tokens=4"]


def P(*args, script="shakespeare_char"):
    return lambda w: [f"data/{script}/prepare.py", *[a.format(**w) for a in args]]


def B(*args):
    return lambda w: ["bench.py", *args]


CASES = {
    # --- train.py settings
    "eval_interval=0": (T(eval_interval=0), r"eval_interval=0: must be at least 1"),
    "eval_spacing=log": (T(eval_spacing="log"), r"eval_spacing='log': expected 'even' or 'doubling'"),
    "log_interval=0": (T(log_interval=0), r"log_interval=0: must be at least 1"),
    "eval_iters=0": (T(eval_iters=0), r"eval_iters=0: must be at least 1"),
    "batch_size=0": (T(batch_size=0), r"batch_size=0: must be at least 1"),
    "block_size=0": (T(block_size=0), r"block_size=0: must be at least 1"),
    "max_iters=-1": (T(max_iters=-1), r"max_iters=-1: must be at least 0"),
    "grad_accum=0": (T(gradient_accumulation_steps=0), r"gradient_accumulation_steps=0: must be at least 1"),
    "lr=1e999": (T(learning_rate="1e999"), r"learning_rate=inf: expected a finite number"),
    "lr<0": (T(learning_rate=-1.0), r"learning_rate=-1.0: expected a finite number >= 0"),
    "beta2=1.5": (T(beta2=1.5), r"beta2=1.5: expected 0 <= beta2 < 1"),
    "dropout=1": (T(dropout=1.0), r"dropout=1.0: expected 0 <= dropout < 1"),
    "n_layer=0": (T(n_layer=0), r"n_layer=0: must be at least 1"),
    "n_head=0": (T(n_head=0), r"n_head=0: must be at least 1"),
    "n_kv_head=0": (T(n_kv_head=0), r"n_kv_head=0: must be at least 1"),
    "n_kv_head=3": (T(n_kv_head=3), r"n_head=2 is not divisible by n_kv_head=3"),
    "device=cuda": (T(device="cuda"), r"no CUDA GPU .*--device=cpu"),
    "device=mps": (T(device="mps"), r"MPS .*not available"),
    "device=tpu": (T(device="tpu"), r"device='tpu': expected cpu, cuda"),
    "dtype=float64": (T(dtype="float64"), r"dtype='float64': expected float32, bfloat16 or float16"),
    "kv_share=echo:9": (T(kv_share="echo:9"), r"kv_share 'echo:9': N must be between 1 and n_layer-1"),
    "kv_share=bogus": (T(kv_share="bogus"), r"kv_share 'bogus': expected 'none', 'echo:N'"),
    "kv_init=median": (T(kv_init="median"), r"kv_init='median': expected 'keep' or 'mean'"),
    "trainable=some": (T(trainable="some"), r"trainable='some': expected one of all, layers, attention, attention\+norms"),
    "trainable=stages:all": (T(trainable="stages:all"), r"trainable='stages:all': expected stages: followed by one of layers"),
    "stages without stages": (T(trainable="stages:layers"), r"trainable='stages:layers' says what trains during a "
                              r"layer-wise conversion's stages: give kv_share_target or att_share_target"),
    "adapt_freeze": (T(adapt_freeze=True), r"adapt_freeze in --adapt_freeze=True is no longer a setting: use "
                     r"trainable=stages:layers"),
    "trainable, no consumer": (T(trainable="attention"), r"trainable='attention' trains only consumers .* no consumer"),
    "init_from=weird": (T(init_from="weird"), r"init_from='weird': expected scratch, resume"),
    "target from scratch": (T(kv_share_target="echo:1"), r"kv_share_target converts a trained model"),
    "att_share=echo:9": (T(att_share="echo:9"), r"att_share 'echo:9': N must be between 1 and n_layer-1"),
    "att_share=bogus": (T(att_share="bogus"), r"att_share 'bogus': expected 'none', 'echo:N'"),
    "att_share=list above": (T(att_share="0,2"), r"att_share '0,2': layer 1 reads layer 2, but a source must be in 0..1"),
    "both kinds on a layer": (T(kv_share="echo:1", att_share="echo:1"), r"layer 1 reads layer 0's K/V and layer 0's "
                              r"attention: a layer reads from other layers at most one kind"),
    "att target from scratch": (T(att_share_target="echo:1"), r"att_share_target converts a trained model"),
    "peak_flops=-5": (T(peak_flops=-5.0), r"peak_flops=-5.0"),
    "unknown key": (lambda w: ["train.py", "--n_layers=3"], r"unknown config key 'n_layers'.*did you mean 'n_layer'"),
    "wrong type": (lambda w: ["train.py", "--n_layer=abc"], r"n_layer='abc' in --n_layer=abc: expected int"),
    "bare non-bool": (lambda w: ["train.py", "--n_layer"], r"n_layer needs a value of type int"),
    "no config file": (lambda w: ["train.py", "config/nope.py"], r"config file 'config/nope.py' not found"),
    "out_dir is a file": (lambda w: ["train.py", *tiny_args(w["data"], w["a_file"])], r"exists and is not a folder"),
    "out_dir under a file": (lambda w: ["train.py", *tiny_args(w["data"], w["a_file"] + "/sub")], r"cannot create out_dir=.*a_file/sub \(Not a directory\)"),
    # --- data
    "dataset absent": (T(dataset="absent"), r"dataset 'absent' is not prepared: run python data/absent/prepare.py"),
    "meta not JSON": (T_data("meta_not_json"), r"meta.json: the dataset's meta is not valid JSON"),
    "meta a list": (T_data("meta_list"), r"meta.json lacks tokenizer, vocab_size or dtype"),
    "meta no vocab": (T_data("meta_no_vocab"), r"meta.json lacks tokenizer, vocab_size or dtype"),
    "meta dtype": (T_data("meta_dtype"), r"dtype 'float64'"),
    "train.bin missing": (T_data("no_train"), r"train.bin is missing: re-run"),
    "val.bin missing": (T_data("no_val"), r"val.bin is missing: re-run"),
    "train.bin empty": (T_data("empty_train"), r"train.bin has 0 tokens, fewer than block_size\+1"),
    "train.bin odd size": (T_data("odd_train"), r"not a whole number of uint16 ids"),
    "ids beyond vocab": (T_data("big_ids"), r"val.bin holds token id 300, outside the vocabulary"),
    "val too short": (T_data("short_val"), r"val.bin has 10 tokens, fewer than block_size\+1 = 33"),
    # --- checkpoints (resume and fine-tune)
    "resume, none": (T(init_from="resume"), r"no checkpoint at .*ckpt.pt"),
    "resume, corrupt": (T_resume("corrupt"), r"corrupt or not a checkpoint"),
    "resume, no optimizer": (T_resume("no_optimizer"), r"lacks 'optimizer': it cannot be resumed"),
    "resume, no iter_num": (T_resume("no_iter"), r"lacks 'iter_num'"),
    "resume, no rng": (T_resume("no_rng"), r"lacks a valid RNG state"),
    "resume, iter_num str": (T_resume("iter_str"), r"has the wrong type"),
    "resume, args str": (T_resume("args_str"), r"model config must be a dict of settings, got str 'hello'"),
    "resume, args type": (T_resume("args_type"), r"model config n_layer='2': expected int, got str"),
    "resume, NaN weights": (T_resume("nan"), r"weight norm.weight has NaN or infinite values"),
    "resume, missing weight": (T_resume("missing_key"), r"missing layers.1.attention.wq.weight"),
    "resume, extra weight": (T_resume("extra_key"), r"unexpected layers.9.attention.wq.weight"),
    "resume, bad shape": (T_resume("bad_shape"), r"norm.weight has shape \(5,\), the config implies \(32,\)"),
    "resume, model not dict": (T_resume("model_list"), r"'model' is not a state dict of tensors"),
    "resume, other schedule": (T_resume("good", kv_share_target="echo:1"),
                               r"kv_share_target='echo:1', but the run being resumed has kv_share_target=''"),
    "resume, malicious pickle": (T_resume("evil_ckpt"), r"corrupt or not a checkpoint \(UnpicklingError\)"),
    "ckpt: missing": (T(init_from="ckpt:/no/such/dir"), r"no checkpoint at /no/such/dir/ckpt.pt"),
    "ckpt: other tokens": (lambda w: ["train.py", *tiny_args(w["datasets"], os.path.join(w["root"], "o-t"),
                                                             dataset="other_tokens", init_from=f"ckpt:{w['good']}")],
                           r"was trained on other tokens than dataset 'other_tokens'"),
    "diverging run": (T(learning_rate=1e30, grad_clip=0.0, warmup_iters=0, eval_interval=5, log_interval=1),
                      r"the loss is nan at iteration \d+: training diverged"),
    # --- distillation
    "distill_alpha>1": (T(distill_alpha=1.5, init_from="ckpt:x"), r"distill_alpha=1.5: expected 0 <= distill_alpha <= 1"),
    "distill_alpha<0": (T(distill_alpha=-0.1), r"distill_alpha=-0.1: expected 0 <= distill_alpha <= 1"),
    "distill temperature 0": (T(distill_temperature=0.0), r"distill_temperature=0.0: expected a number > 0"),
    "distill from scratch": (T(distill_alpha=0.5), r"distill_alpha or distill_hidden > 0 needs a teacher: a run from scratch"),
    "hidden from scratch": (T(distill_hidden=0.5), r"distill_alpha or distill_hidden > 0 needs a teacher: a run from scratch"),
    "distill_hidden>1": (T(distill_hidden=2.0), r"distill_hidden=2.0: expected 0 <= distill_hidden <= 1"),
    "distill_hidden_at=first": (T(distill_hidden_at="first"), r"distill_hidden_at='first': expected one of groups, before_last"),
    "distill weights>1": (T(distill_alpha=0.6, distill_hidden=0.6), r"distill_alpha \+ distill_hidden = 1.2: the two weights"),
    "distill_from weird": (T(distill_alpha=0.5, distill_from="teacher"), r"distill_from='teacher': expected"),
    "teacher missing": (lambda w: ["train.py", *tiny_args(w["data"], os.path.join(w["root"], "t-m"),
                                                          init_from=f"ckpt:{w['good']}", distill_alpha=0.5,
                                                          distill_from="ckpt:/no/teacher")],
                        r"cannot load the teacher from ckpt:/no/teacher: no checkpoint at /no/teacher/ckpt.pt"),
    "teacher other tokens": (lambda w: ["train.py", *tiny_args(w["datasets"], os.path.join(w["root"], "t-o"),
                                                               dataset="other_tokens", distill_alpha=0.5,
                                                               distill_from=f"ckpt:{w['good']}")],
                             r"cannot load the teacher from ckpt:.*was trained on other tokens"),
    "teacher other tokenizer": (lambda w: ["train.py", *tiny_args(w["data"], os.path.join(w["root"], "t-v"),
                                                                  init_from=f"ckpt:{w['good']}", distill_alpha=0.5,
                                                                  distill_from=f"hf:{w['hf_good']}")],
                                r"cannot load the teacher from hf:.*is not tokenized for hf:"),
    "teacher other vocab size": (lambda w: ["train.py", *tiny_args(w["data"], os.path.join(w["root"], "t-w"),
                                                                   init_from=f"ckpt:{w['good']}", distill_alpha=0.5,
                                                                   distill_from=f"ckpt:{w['wide_vocab']}")],
                                 r"the teacher ckpt:.* has a vocabulary of 40, the student 28"),
    # --- sample.py
    "temperature<0": (S("--temperature=-1"), r"temperature=-1.0: expected >= 0"),
    "top_p=0": (S("--top_p=0"), r"top_p=0.0: expected 0 < top_p <= 1"),
    "top_p=1.5": (S("--top_p=1.5"), r"top_p=1.5: expected 0 < top_p <= 1"),
    "top_k<0": (S("--top_k=-1"), r"top_k=-1: expected >= 0"),
    "max_new_tokens=0": (S("--max_new_tokens=0"), r"max_new_tokens and num_samples must be at least 1"),
    "num_samples=0": (S("--num_samples=0"), r"max_new_tokens and num_samples must be at least 1"),
    "sample device=cuda": (S("--device=cuda"), r"no CUDA GPU"),
    "sample dtype": (S("--dtype=half"), r"dtype='half'"),
    "prompt not UTF-8": (lambda w: S(f"--start=FILE:{w['latin1']}")(w), r"the prompt file is not UTF-8 text"),
    "prompt file missing": (S("--start=FILE:/no/such.txt"), r"cannot read the prompt file"),
    "prompt unknown chars": (S("--start=~~"), r"characters not in the model's vocabulary: '~'"),
    "prompt empty": (S("--start="), r"the prompt is empty"),
    "prompt too long": (S("--start=" + "Give me " * 10), r"the prompt is 80 tokens, longer than"),
    "sample no meta": (S(ckpt="no_meta"), r"has no data meta"),
    "sample unknown tokenizer": (S(ckpt="bad_tokenizer"), r"unknown tokenizer 'sentencepiece'"),
    "sample char meta no itos": (S(ckpt="char_no_itos"), r"cannot rebuild its tokenizer \(KeyError"),
    "sample NaN weights": (S(ckpt="nan"), r"has NaN or infinite values"),
    "sample corrupt": (S(ckpt="corrupt"), r"corrupt or not a checkpoint"),
    "sample malicious pickle": (S(ckpt="evil_ckpt"), r"corrupt or not a checkpoint"),
    "sample missing": (lambda w: ["sample.py", "--out_dir=/no/such/dir"], r"no checkpoint at /no/such/dir/ckpt.pt"),
    "sample init_from": (S("--init_from=scratch"), r"init_from='scratch': expected resume, hf:DIR or gguf:FILE"),
    # --- Hugging Face directories
    "hf missing dir": (lambda w: ["sample.py", "--init_from=hf:/no/such/model"], r"no config.json"),
    "hf config not JSON": (S_hf("hf_cfg_not_json"), r"config.json is not valid JSON"),
    "hf config missing key": (S_hf("hf_no_hidden"), r"lacks 'num_attention_heads'"),
    "hf config wrong type": (S_hf("hf_hidden_str"), r"hidden_size='16', expected a whole number"),
    "hf kv heads 0": (S_hf("hf_kv0"), r"num_key_value_heads=0, expected a whole number >= 1"),
    "hf truncated safetensors": (S_hf("hf_truncated"), r"is truncated or not a safetensors file"),
    "hf index not JSON": (S_hf("hf_index_not_json"), r"the shard index is not valid JSON"),
    "hf index missing shard": (S_hf("hf_index_missing_shard"), r"the index lists shard-1.safetensors, which is missing"),
    "hf no weights": (S_hf("hf_no_weights"), r"no model.safetensors, pytorch_model.bin"),
    "hf no tokenizer": (S_hf("hf_good"), r"no tokenizer.json"),
    "hf tokenizer not JSON": (S_hf("hf_tok_not_json"), r"is not a valid tokenizer.json"),
    "hf malicious bin": (S_hf("hf_evil_bin"), r"pytorch_model.bin was refused: not a plain file of tensors"),
    "hf train, other tokens": (lambda w: ["train.py", *tiny_args(w["data"], os.path.join(w["root"], "o-hf"),
                                                                 init_from=f"hf:{w['hf_good']}")],
                               r"is not tokenized for hf:"),
    # --- GGUF files
    "gguf missing": (lambda w: ["sample.py", "--init_from=gguf:/no/such.gguf"], r"/no/such.gguf: no such GGUF file"),
    "gguf not GGUF": (S_gguf("gguf_not"), r"m.gguf is truncated or not a GGUF file"),
    "gguf truncated": (S_gguf("gguf_truncated"), r"m.gguf is truncated or not a GGUF file"),
    "gguf other architecture": (S_gguf("gguf_arch"), r"architecture 'gpt2' is not supported, only 'llama'"),
    "gguf missing metadata": (S_gguf("gguf_no_heads"), r"lacks the metadata 'llama.attention.head_count'"),
    "gguf tensor type": (S_gguf("gguf_i32"), r"tensor token_embd.weight has type I32, which the gguf package cannot"),
    "gguf sentencepiece": (S_gguf("gguf_spm"), r"tokenizer model 'llama' is not supported, only 'gpt2'"),
    "gguf pre-tokenizer": (S_gguf("gguf_pre"), r"pre-tokenizer 'qwen2' is not supported"),
    "gguf two in folder": (S_gguf("gguf_two"), r"expected one .gguf file in the folder, found 2 \(m.gguf, n.gguf\)"),
    "gguf train, other tokens": (lambda w: ["train.py", *tiny_args(w["data"], os.path.join(w["root"], "o-gguf"),
                                                                   init_from=f"gguf:{w['gguf_good']}")],
                                 r"is not tokenized for gguf:"),
    "gguf analyze, no dataset": (lambda w: ["-m", "tools.analyze", "layers", f"--init_from=gguf:{w['gguf_good']}",
                                            "--n_sources=1"], r"--init_from needs --dataset=NAME"),
    "gguf prepare, bad file": (P("--tokenizer=gguf:{gguf_arch}", "--out_dir={root}/p6", script="shakespeare"),
                               r"architecture 'gpt2' is not supported"),
    # --- prepare.py
    "prepare not UTF-8": (P("--input={latin1}", "--out_dir={root}/p1"), r"is not UTF-8 text"),
    "prepare out_dir is a file": (P("--out_dir={a_file}"), r"--out_dir .* exists and is not a folder"),
    "prepare input missing": (P("--input=/no/such.txt", "--out_dir={root}/p2"), r"--input /no/such.txt: no such file"),
    "prepare one character": (P("--input={one_char}", "--out_dir={root}/p3"), r"the train split has 0 tokens"),
    "prepare bad tokenizer": (P("--tokenizer=sentencepiece", "--out_dir={root}/p4", script="shakespeare"),
                              r"--tokenizer 'sentencepiece': expected gpt2, hf:DIR or gguf:FILE"),
    "prepare hf tokenizer bad": (P("--tokenizer=hf:{hf_tok_not_json}", "--out_dir={root}/p5", script="shakespeare"),
                                 r"is not a valid tokenizer.json"),
    # --- bench.py
    "bench preset": (B("--preset=huge"), r"unknown preset 'huge'"),
    "bench rounds=0": (B("--quick", "--rounds=0"), r"rounds=0: must be at least 1"),
    "bench device=cuda": (B("--quick", "--device=cuda"), r"no CUDA GPU"),
    "bench parts": (B("--quick", "--parts=everything", "--rounds=1"), r"parts='everything'"),
    "bench att variant": (B("--quick", "--variants=none;att=bogus", "--rounds=1"), r"att_share 'bogus': expected"),
    "bench variant kind": (B("--quick", "--variants=none;q=echo:1", "--rounds=1"), r"variant 'q=echo:1': expected a kv_share"),
    "bench n_layer=0": (B("--quick", "--n_layer=0"), r"n_layer=0: must be at least 1"),
    "bench bare non-bool": (B("--rounds"), r"rounds needs a value of type int"),
}


# the cases run as real processes: one per kind of entry point (a root script, a data script, `-m` a tool)
AS_A_PROCESS = {"unknown key", "sample malicious pickle", "bench preset", "prepare input missing",
                "gguf analyze, no dataset"}


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_dir):
    world = build_world(tmp_path_factory.mktemp("bad"), data_dir)
    out = {}
    for name, (argv_of, _) in CASES.items():
        argv = argv_of(world)
        out[name] = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=1200) \
            if name in AS_A_PROCESS else run_script(*argv)
    out["__world__"] = world
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(results, name):
    r, match = results[name], CASES[name][1]
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    last = re.split(r"[\r\n]", r.stderr.strip())[-1]
    assert last.startswith("error: ") and re.search(match, last), last
    assert not os.path.exists(results["__world__"]["marker"]), "a malicious pickle ran"


def test_there_are_enough_cases():
    assert len(CASES) >= 80 and AS_A_PROCESS <= set(CASES)
