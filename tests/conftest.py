"""Shared fixtures and helpers. Run as the README says, pytest -n auto --dist loadfile: each test module in one
worker (its module fixtures built once), one torch thread per worker."""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
import warnings

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one torch thread per worker, and for the processes it starts
    os.environ["OMP_NUM_THREADS"] = "1"   # (N workers of two threads on two cores slow each other 5-20x)

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# tests import the top-level scripts (model.py, train.py, ...) as modules
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.common import chunked, write_dataset  # noqa: E402
from echo.tokenizer import char_meta  # noqa: E402
from model import LLaMA, ModelConfig  # noqa: E402
from echo.pretrained import GGUF_LAYER_NAMES  # noqa: E402
from configurator import configure  # noqa: E402
from train import TrainConfig, train

TEXT = "".join(f"{w} the {v} of {n};\n" for w in ("Where is", "Give me", "Speak")
               for v in ("king", "queen", "fool", "night") for n in ("Rome", "France", "Verona")) * 60


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    os.makedirs(root / "tiny")
    n = int(0.9 * len(TEXT))
    write_dataset(str(root / "tiny"), char_meta(TEXT), {"train": chunked(TEXT[:n]), "val": chunked(TEXT[n:])})
    return str(root)


def tiny_args(data_dir, out_dir, **kw):
    args = dict(data_dir=data_dir, dataset="tiny", out_dir=str(out_dir), n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                block_size=32, batch_size=4, max_iters=30, lr_decay_iters=30, warmup_iters=5, eval_interval=10,
                eval_iters=4, log_interval=10, learning_rate=3e-3, device="cpu", dtype="float32", compile=False)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def pretrained(data_dir, tmp_path_factory):
    """A 4-layer model trained 20 iterations on the tiny data: the model conversion tests start from."""
    out = tmp_path_factory.mktemp("pretrained")
    run(data_dir, out, n_layer=4, max_iters=20, lr_decay_iters=20)
    return str(out)


def run_script(*argv, input=None):
    """What `python *argv` would give (exit code, stdout, stderr), run in this process as `__main__` with `input` on
    its stdin: the script's own code path without a second interpreter and torch import. For tests of what a
    script does; where the process itself is what is tested (its exit code as the shell sees it, a second process,
    a terminal), run it as one."""
    saved = sys.argv, list(sys.path), os.getcwd(), sys.stdin
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(ROOT)
        sys.stdin = io.StringIO(input or "")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if argv[0] == "-m":
                sys.argv = list(argv[1:])
                with warnings.catch_warnings():  # a tool the tests imported already runs again as __main__: as meant
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # as the interpreter does at exit: None is 0, a message is printed and exits 1
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, (int, type(None))):
            err.write(f"{e.code}\n")
    except BaseException:  # an uncaught exception: the interpreter would print its traceback
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv, sys.path[:], sys.stdin = saved[0], saved[1], saved[3]
        os.chdir(saved[2])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run(data_dir, out_dir, **kw):
    return train(configure(TrainConfig(), tiny_args(data_dir, out_dir, **kw)))


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def kv_stages(start, target):
    """The kv_sources of each adaptation stage; the final full fine-tuning must repeat the last one."""
    from echo.conversion import adaptation_stages
    stages = adaptation_stages({"kv_sources": start, "att_sources": list(range(len(start)))}, target)
    assert stages[-1] == dict(stages[-2], trainable="all") and all(st["att_sources"] == list(range(len(start)))
                                                               for st in stages)
    return [st["kv_sources"] for st in stages[:-1]]


# ----------------------------------------------------------------------------------------------------
# GGUF files written in the tests, as llama.cpp's converter writes them

GGUF_NAMES_BACK = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                   "output.weight": "output.weight"}


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to attn_q / attn_k rows: within each head, the two halves that
    Hugging Face's RoPE pairs (j, j + hd/2) become adjacent rows (2j, 2j + 1). w: (n_heads * hd, in)."""
    out, cols = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def bpe_tokenizer(vocab_size=300, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), texts=(TEXT,)):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the test text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_gguf(path, model, qtype="F32", tokenizer=None, arch="llama", tokenizer_model="gpt2", pre="default",
               add_bos=None, drop=(), encode=None, chat_template=None, eos=None):
    """Write one of our models as a GGUF file: llama.* metadata, Q/K rows permuted as llama.cpp does,
    2-D weights in `qtype` (norms stay F32, as llama.cpp keeps them), the tokenizer as tokenizer.ggml.*
    (end token <|im_end|> unless eos names another id; a chat template if given).
    drop: metadata keys to leave out; encode(array, type): the tensor's bytes (default: gguf's quantize).
    Returns the state dict as the file holds it, dequantized (for the default encode)."""
    import gguf
    from gguf.quants import dequantize, quantize
    encode = encode or quantize
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": (w.add_block_count, c.n_layer), "context_length": (w.add_context_length, c.block_size),
            "embedding_length": (w.add_embedding_length, c.n_embd),
            "feed_forward_length": (w.add_feed_forward_length, c.intermediate_size),
            "head_count": (w.add_head_count, c.n_head), "head_count_kv": (w.add_head_count_kv, c.n_kv_head),
            "rope_freq_base": (w.add_rope_freq_base, c.rope_theta),
            "layer_norm_rms_eps": (w.add_layer_norm_rms_eps, c.norm_eps), "vocab_size": (w.add_vocab_size, c.vocab_size)}
    for key, (add, value) in meta.items():
        if key not in drop:
            add(value)
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        merges = [m if isinstance(m, str) else " ".join(m)
                  for m in json.loads(tokenizer.to_str())["model"]["merges"]]
        w.add_tokenizer_model(tokenizer_model)
        w.add_tokenizer_pre(pre)
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
        w.add_token_merges(merges)
        w.add_bos_token_id(tokenizer.token_to_id("<|endoftext|>"))
        w.add_eos_token_id(tokenizer.token_to_id("<|im_end|>") if eos is None else eos)
        if chat_template is not None:
            w.add_chat_template(chat_template)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
    held = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and c.tie_embeddings:
            continue  # a tied head is not stored: the reader ties it back
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            gname = f"blk.{i}." + {v: k for k, v in GGUF_LAYER_NAMES.items()}[rest]
        else:
            gname = GGUF_NAMES_BACK[name]
        a = t.float().numpy()
        kind = getattr(gguf.GGMLQuantizationType, qtype if a.ndim == 2 else "F32")
        # quantization works on blocks within a row, so permuting rows commutes with it: the values the file
        # holds are those of the unpermuted weight, quantized
        if encode is quantize or a.ndim < 2:
            held[name] = torch.from_numpy(dequantize(quantize(a, kind), kind).reshape(a.shape).copy())
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            a = llama_cpp_permute(a, c.n_head if "attn_q" in gname else c.n_kv_head)
        w.add_tensor(gname, encode(a, kind) if a.ndim == 2 else quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if c.tie_embeddings and "tok_embeddings.weight" in held:
        held["output.weight"] = held["tok_embeddings.weight"]
    return held


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a test.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_gguf(path, tokenizer, block_size=200, template=CHATML, eos=None, **sharing):
    """A 5-layer GQA LLaMA with sizes that do not divide evenly (vocab 300, 6 heads / 2 KV heads of 10, d=60, SwiGLU 70), as a
    GGUF file with its tokenizer, a chat template and an end token."""
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=tokenizer.get_vocab_size(), block_size=block_size, n_layer=5, n_head=6,
                              n_kv_head=2, n_embd=60, intermediate_size=70))
    write_gguf(path, model, tokenizer=tokenizer, chat_template=template, eos=eos)
    return str(path)
