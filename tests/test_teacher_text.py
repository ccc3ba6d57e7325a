"""data/teacher_text/prepare.py: text a (tiny) teacher writes, deterministic by seed, resumable without loss,
each document its opening and what the model wrote up to its end token; bad input is one line. And a dataset
prepared for evaluation only (WikiText-2) evaluated on its own with eval_only."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, TEXT, bpe_tokenizer, read_log, run, run_script, tiny_args, tiny_gguf
from data.common import chunked, write_dataset
from echo.tokenizer import char_meta, text_encoder
from echo.pretrained import gguf_meta, import_pretrained

SCRIPT = os.path.join(ROOT, "data", "teacher_text", "prepare.py")
spec = importlib.util.spec_from_file_location("teacher_text", SCRIPT)
teacher_text = importlib.util.module_from_spec(spec)
spec.loader.exec_module(teacher_text)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("teacher") / "tiny.gguf", bpe_tokenizer())


def prepare(teacher, out_dir, *extra):
    """The writer on the tiny teacher, eager (compiling it is one test's point)."""
    extra = extra if any(e.startswith("--compile") for e in extra) else (*extra, "--compile=False")
    return run_script(SCRIPT, f"--teacher=gguf:{teacher}", f"--out_dir={out_dir}", "--batch_size=3",
                      "--max_new_tokens=9", "--seed=7", *extra)


def splits(out_dir):
    return {s: (out_dir / f"{s}.bin").read_bytes() for s in ("train", "val")}


def test_same_seed_same_text_and_a_resumed_run_equals_an_uninterrupted_one(teacher, tmp_path):
    whole = prepare(teacher, tmp_path / "whole", "--tokens=1500", "--dtype=float32")
    assert whole.returncode == 0, whole.stderr
    chunks = [f for f in os.listdir(tmp_path / "whole" / "chunks") if f.endswith(".bin")]
    assert len(chunks) >= 10  # enough batches that every 10th is val
    # again, through the compiled decode step: the same text (fp32, where compiled and eager agree to the token)
    assert prepare(teacher, tmp_path / "again", "--tokens=1500", "--dtype=float32", "--compile=True").returncode == 0
    assert splits(tmp_path / "again") == splits(tmp_path / "whole")
    # interrupted: a first run stops early, then a crash loses a finished batch and leaves a half-written one
    part = tmp_path / "part"
    assert prepare(teacher, part, "--tokens=500", "--dtype=float32").returncode == 0
    done = sorted(f for f in os.listdir(part / "chunks") if f.endswith(".bin"))
    os.remove(part / "chunks" / done[-1])
    (part / "chunks" / (done[-1] + ".tmp")).write_bytes(b"\x01\x02\x03")
    resumed = prepare(teacher, part, "--tokens=1500", "--dtype=float32")
    assert resumed.returncode == 0, resumed.stderr
    assert splits(part) == splits(tmp_path / "whole")
    meta = json.loads((part / "meta.json").read_text())
    n = {s: len(np.fromfile(part / f"{s}.bin", dtype=meta["dtype"])) for s in ("train", "val")}
    assert n["train"] + n["val"] >= 1500 and 0 < n["val"] < n["train"]
    assert meta["tokenizer_json"] == gguf_meta(teacher)["tokenizer_json"]


def test_each_document_is_its_opening_then_the_model_up_to_its_end_token(teacher):
    meta, model = gguf_meta(teacher), import_pretrained(f"gguf:{teacher}").eval()
    encode = text_encoder(meta)
    prompts = [encode(s) for s in ("The history of", "A", "The novel tells the story of")]  # unequal lengths
    eot = meta["eot"]
    torch.manual_seed(3)
    free = teacher_text.write_documents(model, prompts, 10, [], eot, meta["vocab_size"], 0.95)
    for p, doc in zip(prompts, free):  # no end token sampled: the prompt, 10 tokens, then the end token added
        assert doc[:len(p)] == p and len(doc) == len(p) + 11 and doc[-1] == eot
    # end at a token the first row samples after its prompt: that row's document ends right there, the others
    # are unchanged up to their own first end token (sampling does not depend on when rows stop)
    stop_id = free[0][len(prompts[0]) + 2]
    torch.manual_seed(3)
    cut = teacher_text.write_documents(model, prompts, 10, [stop_id], eot, meta["vocab_size"], 0.95)
    for p, doc, full in zip(prompts, cut, free):
        generated = full[len(p):-1]
        end = generated.index(stop_id) + 1 if stop_id in generated else None
        assert doc == (p + generated[:end] if end else full)
    assert cut[0][-1] == stop_id and len(cut[0]) <= len(prompts[0]) + 3


def test_chat_openings_are_rendered_in_the_models_template(teacher, tmp_path):
    assert prepare(teacher, tmp_path / "t", "--tokens=60").returncode == 0
    from echo.tokenizer import tokenizer_from_meta
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    decode = tokenizer_from_meta(meta)[1]
    odd = np.fromfile(tmp_path / "t" / "chunks" / "00001.bin", dtype=meta["dtype"]).tolist()
    assert decode(odd).startswith("<|im_start|>system\nYou are a test.<|im_end|>\n<|im_start|>user\n")
    even = decode(np.fromfile(tmp_path / "t" / "chunks" / "00000.bin", dtype=meta["dtype"]).tolist())
    assert any(even.startswith(s) for s in teacher_text.PLAIN)


@pytest.mark.parametrize("extra,match", [
    (["--tokens=0"], "--tokens, --batch_size and --max_new_tokens must be at least 1"),
    (["--tokens=10", "--top_p=0"], "--top_p in (0, 1]"),
    (["--tokens=10", "--teacher=gguf:/no/such.gguf"], "/no/such.gguf"),
    (["--tokens=10", "--device=cuda:99"], "device='cuda:99', but"),  # no GPU here, or not 100 of them
    (["--tokens=10", "--device=tpu"], "device='tpu': expected cpu, cuda"),
    (["--tokens=10", "--dtype=float64"], "dtype='float64': expected float32, bfloat16 or float16"),
    (["--tokens=10", "--compile=yes"], "--compile=yes: expected True or False"),
])
def test_bad_input_is_one_line(teacher, tmp_path, extra, match):
    r = prepare(teacher, tmp_path / "bad", *extra)
    assert r.returncode == 1 and "Traceback" not in r.stderr and match in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_shipped_corpus_gives_what_tokens_asks_and_a_larger_ask_writes_on_from_it(teacher, tmp_path, monkeypatch,
                                                                                      capsys):
    """The corpus shipped beside the script stands in for the batches it holds, but only as many as --tokens asks
    for: the same --tokens gives the same corpus with or without it, and a larger one writes on after it."""
    def chunks(out_dir):
        files = sorted(f for f in os.listdir(out_dir / "chunks") if f.endswith(".bin"))
        return [(out_dir / "chunks" / f).read_bytes() for f in files]

    fresh = {}
    for n in (150, 400, 1400):  # fewer batches than shipped, exactly the shipped ones, more
        ship = f"--ship={tmp_path / 'ship.npz'}" if n == 400 else "--ship="
        assert prepare(teacher, tmp_path / f"fresh{n}", f"--tokens={n}", ship).returncode == 0
        fresh[n] = chunks(tmp_path / f"fresh{n}")
    shipped = np.load(tmp_path / "ship.npz")
    names = sorted(k for k in shipped.files if k != "settings")
    assert len(fresh[150]) < len(names) == len(fresh[400]) < len(fresh[1400])
    marked = {k: (shipped[k] + 1) % 256 for k in names}  # the same lengths, other ids: a restored batch shows
    np.savez_compressed(tmp_path / "marked.npz", settings=shipped["settings"], **marked)
    monkeypatch.setattr(teacher_text, "SHIPPED", str(tmp_path / "marked.npz"))
    for n, reference in fresh.items():
        out = tmp_path / f"from_ship{n}"
        teacher_text.main([f"--teacher=gguf:{teacher}", f"--out_dir={out}", "--batch_size=3", "--max_new_tokens=9",
                           "--seed=7", f"--tokens={n}", "--compile=False"])
        got, k = chunks(out), min(len(reference), len(names))
        assert f"starting from {k} of the batches shipped" in capsys.readouterr().out
        assert len(got) == len(reference), (n, len(got), len(reference))
        assert got[:k] == [marked[name].tobytes() for name in names[:k]]
        assert got[k:] == reference[k:]  # written on after the shipped batches, as an uninterrupted run writes them


def test_other_settings_in_the_same_folder_are_one_line(teacher, tmp_path):
    assert prepare(teacher, tmp_path / "t", "--tokens=30").returncode == 0
    r = prepare(teacher, tmp_path / "t", "--tokens=30", "--max_new_tokens=5")
    assert r.returncode == 1 and "written with other settings" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_only_evaluates_a_dataset_prepared_for_evaluation_only(data_dir, tmp_path):
    """WikiText-2 is prepared val-only on purpose: eval_only evaluates it, training on it says why it cannot."""
    text = TEXT[::-1]  # other text, the same characters
    os.makedirs(tmp_path / "data" / "heldout")
    write_dataset(str(tmp_path / "data" / "heldout"), char_meta(text), {"val": chunked(text)})
    os.symlink(os.path.join(data_dir, "tiny"), tmp_path / "data" / "tiny")
    run(str(tmp_path / "data"), tmp_path / "run", max_iters=4, eval_interval=2)
    def args(out_dir, **kw):
        return tiny_args(str(tmp_path / "data"), out_dir, dataset="heldout", init_from=f"ckpt:{tmp_path / 'run'}", **kw)
    r = run_script("train.py", *args(tmp_path / "eval", eval_only=True))
    assert r.returncode == 0, r.stderr
    (record,) = read_log(tmp_path / "eval")
    assert record["train_loss"] is None and record["val_loss"] > 0 and "step 0: val loss" in r.stdout
    # the val-only set named beside a run is evaluated under its own name at every eval
    run(str(tmp_path / "data"), tmp_path / "beside", init_from=f"ckpt:{tmp_path / 'run'}", eval_datasets="heldout",
        max_iters=0)
    assert read_log(tmp_path / "beside")[0]["eval_losses"]["heldout"] == record["val_loss"]
    train = run_script("train.py", *args(tmp_path / "t2"))
    assert train.returncode == 1 and "prepared for evaluation only" in train.stderr
    assert len(train.stderr.strip().splitlines()) == 1, train.stderr
