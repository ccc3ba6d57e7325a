import io
import os
from dataclasses import replace

import pytest
import torch

from echo.checkpoint import load_checkpoint, model_from_checkpoint
from conftest import run, run_script
from echo.tokenizer import tokenizer_from_meta
from echo.generate import sample_logits
from model import UsageError
from echo.costs import kv_cache_bytes
from sample import SampleConfig, sample
from test_model import naive_greedy


@pytest.fixture(scope="module", params=["none", "echo:2"])
def ckpt_dir(request, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run(data_dir, out, kv_share=request.param, n_layer=3, n_kv_head=2, max_iters=40, lr_decay_iters=40)
    return str(out)


def cfg(ckpt_dir, **kw):
    return replace(SampleConfig(out_dir=ckpt_dir, device="cpu", dtype="float32", compile=False,
                                num_samples=2, max_new_tokens=24, start="Give me"), **kw)


def test_greedy_is_deterministic_and_equals_uncached_greedy(ckpt_dir):
    texts, _ = sample(cfg(ckpt_dir, temperature=0.0))
    again, _ = sample(cfg(ckpt_dir, temperature=0.0, seed=7))
    assert texts == again and texts[0] == texts[1]
    ckpt = load_checkpoint(os.path.join(ckpt_dir, "ckpt.pt"))
    model = model_from_checkpoint(ckpt).eval()
    encode, decode = tokenizer_from_meta(ckpt["meta"])
    with torch.no_grad():
        idx = naive_greedy(model, torch.tensor([encode("Give me")]), 24)
    assert model.config.vocab_size == ckpt["meta"]["vocab_size"]  # no padded ids the recompute loop could pick
    assert texts[0] == decode(idx[0].tolist())


def test_compiled_decode_step_compiles_once_and_matches_eager(ckpt_dir):
    eager, _ = sample(cfg(ckpt_dir, temperature=0.0))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile per token or sample would raise
        compiled, _ = sample(cfg(ckpt_dir, temperature=0.0, compile=True))
    assert compiled == eager


def test_summary_reports_cache_bytes_by_formula(ckpt_dir):
    _, stats = sample(cfg(ckpt_dir, num_samples=3, max_new_tokens=10))
    model_cfg = model_from_checkpoint(load_checkpoint(os.path.join(ckpt_dir, "ckpt.pt"))).config
    max_len = len("Give me") + 10
    assert stats["kv_cache_bytes"] == kv_cache_bytes(model_cfg, 3, max_len, bytes_per_element=4)
    assert stats["kv_cache_bytes_unshared"] == kv_cache_bytes(replace(model_cfg, kv_share="none"), 3, max_len, 4)
    assert stats["kv_cache_bytes"] * 3 == stats["kv_cache_bytes_unshared"] * stats["v_slots"]


def test_streaming_one_sample_prints_the_text(ckpt_dir):
    out = io.StringIO()
    texts, _ = sample(cfg(ckpt_dir, num_samples=1, temperature=0.0), out=out)
    assert out.getvalue() == texts[0]


def test_generation_past_the_window_keeps_going(ckpt_dir):
    out = io.StringIO()
    texts, stats = sample(cfg(ckpt_dir, num_samples=1, max_new_tokens=50), out=out)  # block_size is 32
    assert "exceeds the context window (32)" in out.getvalue()
    assert len(texts[0]) == len("Give me") + 50


@pytest.mark.parametrize("kw,match", [
    (dict(start="Give me ~"), "characters not in the model's vocabulary: '~'"),
    (dict(start="Give me " * 10), "the prompt is 80 tokens, longer than the model's context window block_size=32"),
    (dict(start=""), "the prompt is empty"),
    (dict(start="FILE:/no/such/prompt.txt"), "cannot read the prompt file"),
    (dict(max_new_tokens=0), "must be at least 1"),
])
def test_bad_inputs_are_clear_errors(ckpt_dir, kw, match):
    with pytest.raises(UsageError, match=match):
        sample(cfg(ckpt_dir, **kw))


def test_missing_and_corrupt_checkpoints_from_the_command_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"\x80\x02garbage")
    for out_dir, match in [(tmp_path / "none", "no checkpoint at"), (tmp_path, "corrupt or not a checkpoint")]:
        r = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu")
        assert r.returncode == 1 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_prompt_from_file(ckpt_dir, tmp_path):
    (tmp_path / "p.txt").write_text("Give me")
    a, _ = sample(cfg(ckpt_dir, start=f"FILE:{tmp_path / 'p.txt'}", temperature=0.0))
    b, _ = sample(cfg(ckpt_dir, temperature=0.0))
    assert a == b


def draws(logits, n=4000, **kw):
    torch.manual_seed(0)
    return set(sample_logits(logits.expand(n, -1).clone(), **kw).flatten().tolist())


def test_top_k_and_top_p_never_leave_the_allowed_set():
    probs = torch.tensor([[0.05, 0.5, 0.02, 0.3, 0.13]])
    logits = probs.log()
    assert draws(logits) == {0, 1, 2, 3, 4}
    assert draws(logits, top_k=2) == {1, 3}
    assert draws(logits, top_p=0.5) == {1}           # 0.5 alone reaches 0.5
    assert draws(logits, top_p=0.75) == {1, 3}       # 0.5 + 0.3
    assert draws(logits, top_p=0.85) == {1, 3, 4}    # 0.5 + 0.3 + 0.13
    assert draws(logits, top_k=3, top_p=0.6) == {1, 3}
    assert draws(logits, temperature=0) == {1}


def test_padded_vocab_ids_are_never_sampled():
    logits = torch.tensor([[0.0, 1.0, 2.0, 50.0, 50.0]])  # ids 3 and 4 are padding, and the most likely
    assert draws(logits, vocab_limit=3) == {0, 1, 2}
    assert draws(logits, vocab_limit=3, temperature=0) == {2}
