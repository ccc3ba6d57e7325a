"""Prepare scripts, run as users run them (subprocesses), on the shared offline copies when present."""
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_script
from data.common import fetch_text, id_dtype, write_tokens
from echo.tokenizer import tokenizer_from_meta
from model import UsageError

SHAKESPEARE = os.environ.get("TINYSHAKESPEARE_INPUT")  # .ci/run points this at the shared offline copy
SMALL_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def prepare(name, *args):
    return run_script(os.path.join(ROOT, "data", name, "prepare.py"), *args)


def load(out_dir):
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    return meta, {s: np.fromfile(os.path.join(out_dir, f"{s}.bin"), dtype=meta["dtype"]) for s in ("train", "val")}


def gpt2_available():
    try:
        tokenizer_from_meta({"tokenizer": "gpt2"})
        return True
    except Exception:  # no network and no TIKTOKEN_CACHE_DIR: echo/tokenizer.py says so in one line
        return False


needs_gpt2 = pytest.mark.skipif(not gpt2_available(), reason="GPT-2 BPE files unavailable (set TIKTOKEN_CACHE_DIR)")


@pytest.mark.skipif(not SHAKESPEARE, reason="set TINYSHAKESPEARE_INPUT to the 1,115,394-character input.txt")
def test_char_prepare_on_tinyshakespeare(tmp_path):
    r = prepare("shakespeare_char", "--input", SHAKESPEARE, "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    meta, data = load(tmp_path)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == 65 and meta["dtype"] == "uint16"
    assert (len(data["train"]), len(data["val"])) == (1_003_854, 111_540)
    _, decode = tokenizer_from_meta(meta)
    with open(SHAKESPEARE) as f:
        assert decode(data["train"][:200].tolist()) == f.read(200)


@needs_gpt2
def test_bpe_prepare_roundtrips(tmp_path):
    src = SHAKESPEARE
    if not src:
        src = tmp_path / "input.txt"
        src.write_text(SMALL_TEXT)
    r = prepare("shakespeare", "--input", str(src), "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    meta, data = load(tmp_path / "out")
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16"
    if SHAKESPEARE:
        assert (len(data["train"]), len(data["val"])) == (301_966, 36_059)
    text = open(src).read()
    _, decode = tokenizer_from_meta(meta)
    assert decode(data["train"].tolist()) + decode(data["val"].tolist()) == text


def test_char_prepare_small_text_roundtrips(tmp_path):
    (tmp_path / "in.txt").write_text(SMALL_TEXT)
    r = prepare("shakespeare_char", "--input", str(tmp_path / "in.txt"), "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    meta, data = load(tmp_path)
    _, decode = tokenizer_from_meta(meta)
    assert meta["vocab_size"] == len(set(SMALL_TEXT))
    assert decode(data["train"].tolist()) + decode(data["val"].tolist()) == SMALL_TEXT
    assert len(data["train"]) == int(0.9 * len(SMALL_TEXT))


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare", "tinystories"])
def test_missing_input_file_is_one_clear_line(tmp_path, name):
    r = prepare(name, "--input", str(tmp_path / "nope"), "--out_dir", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_failed_download_says_what_to_do(tmp_path):
    with pytest.raises(UsageError, match="could not download .* pass --input PATH"):
        fetch_text("http://127.0.0.1:9/input.txt", None, str(tmp_path / "input.txt"))  # port 9: refused at once
    assert not os.path.exists(tmp_path / "input.txt")


def test_token_ids_must_fit_the_vocabulary(tmp_path):
    assert id_dtype(65) == np.uint16 and id_dtype(65536) == np.uint16 and id_dtype(65537) == np.uint32
    with pytest.raises(UsageError, match="token id 70000 does not fit the vocabulary of 65"):
        write_tokens(["x"], lambda s: [1, 70000], str(tmp_path / "t.bin"), 65)
    assert not os.path.exists(tmp_path / "t.bin")  # nothing half-written is left behind
    n = write_tokens(["ab", "c"], lambda s: [ord(c) for c in s], str(tmp_path / "big.bin"), 100_000)
    assert n == 3 and np.fromfile(tmp_path / "big.bin", dtype=np.uint32).tolist() == [97, 98, 99]


def test_unknown_characters_are_named():
    encode, _ = tokenizer_from_meta({"tokenizer": "char", "itos": list("abc"), "vocab_size": 3})
    with pytest.raises(ValueError, match="'xz'"):
        encode("abzx")


def tinystories_module():
    spec = importlib.util.spec_from_file_location("ts_prepare", os.path.join(ROOT, "data", "tinystories", "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tinystories_chunks_cover_the_file_and_cut_at_newlines(tmp_path):
    text = "".join(f"Story {i} is short.\nThe end.\n<|endoftext|>\n" for i in range(300)) + "no newline at end"
    (tmp_path / "t.txt").write_text(text)
    chunks = list(tinystories_module().read_chunks(tmp_path / "t.txt", size=100))
    assert "".join(chunks) == text and len(chunks) > 10
    assert all(c.endswith("\n") for c in chunks[:-1])


@needs_gpt2
def test_tinystories_prepare_offline_maps_endoftext(tmp_path):
    mod = tinystories_module()
    for name in mod.FILES.values():
        (tmp_path / name).write_text("Once upon a time.\n<|endoftext|>\nThe cat sat.\n<|endoftext|>\n" * 20)
    r = prepare("tinystories", "--input", str(tmp_path), "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    meta, data = load(tmp_path / "out")
    assert (data["train"] == meta["eot"]).sum() == 40 and (data["val"] == meta["eot"]).sum() == 40
