import math
import os

import pytest
import torch

from echo.checkpoint import config_from_dict
from echo.generate import generate
from model import LLaMA, ModelConfig, UsageError, resolve_sources
from echo.costs import kv_cache_bytes, training_flops_per_token

SPECS = ["none", "echo:3", "cla:2", "0,0,2,2,2,5"]


def tiny(kv_share="none", n_kv_head=2, **kw):
    cfg = dict(vocab_size=97, block_size=32, n_layer=6, n_head=4, n_kv_head=n_kv_head, n_embd=32, kv_share=kv_share)
    cfg.update(kw)
    torch.manual_seed(0)
    return LLaMA(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["gqa", "mqa"])
def test_prefill_and_decode_match_full_forward(spec, n_kv_head):
    model = tiny(spec, n_kv_head)
    idx = torch.randint(0, 97, (2, 20))
    full, _, _ = model(idx, all_logits=True)
    model.setup_cache(batch_size=2, max_len=32)
    # prefill 7, then a chunk of 5 at an offset (several queries per step through the mask), then one at a time
    chunks = [model(idx[:, :7], input_pos=torch.arange(7), all_logits=True)[0],
              model(idx[:, 7:12], input_pos=torch.arange(7, 12), all_logits=True)[0]]
    for t in range(12, 20):
        chunks.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0])
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    # without targets or all_logits only the last position is computed, and it is the same row
    last, _, _ = model(idx)
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def naive_greedy(model, idx, n):
    """Recompute the whole context for every new token (no cache), as nanoGPT samples."""
    for _ in range(n):
        logits, _, _ = model(idx)
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["gqa", "mqa"])
def test_greedy_generation_equals_recompute_loop(spec, n_kv_head):
    model = tiny(spec, n_kv_head)
    with torch.no_grad():  # random init gives flat logits; sharpen them so argmax is not a near tie
        model.output.weight.mul_(20)
    idx = torch.randint(0, 97, (2, 5))
    out = generate(model, idx, max_new_tokens=20, temperature=0)
    assert out.shape == (2, 25)
    assert torch.equal(out, naive_greedy(model, idx, 20))


def test_generation_past_the_window_slides_instead_of_failing():
    model = tiny("echo:2")
    out = generate(model, torch.zeros(1, 30, dtype=torch.long), max_new_tokens=10, temperature=0)
    assert out.shape == (1, 40)


def test_consumers_have_no_kv_weights_and_no_cache_slot():
    model = tiny("echo:3")
    assert model.kv_sources == [0, 1, 2, 2, 2, 2]
    keys = model.state_dict().keys()
    for i in range(6):
        has_kv = {f"layers.{i}.attention.wk.weight", f"layers.{i}.attention.wv.weight"} <= set(keys)
        assert has_kv == (i <= 2), f"layer {i}"
        assert f"layers.{i}.attention.wq.weight" in keys and f"layers.{i}.attention.wo.weight" in keys
    model.setup_cache(batch_size=3, max_len=16)
    assert model.kv_cache.n_slots["k"] == 3 and model.kv_cache.k2.shape == (3, 2, 16, 8)  # 3 producer slots, not 6
    assert not any("kv_cache" in k for k in keys)


def closed_form_params(V, L, d, H, KVH, ff, n_producers, tied):
    hd = d // H
    per_layer = 2 * d * H * hd + 3 * d * ff + 2 * d  # wq, wo, SwiGLU, two norms
    return V * d + L * per_layer + n_producers * 2 * d * KVH * hd + d + (0 if tied else V * d)


@pytest.mark.parametrize("spec,n_producers", [("none", 6), ("echo:3", 3), ("echo:5", 1), ("cla:2", 3), ("cla:3", 2)])
@pytest.mark.parametrize("tied", [True, False])
def test_param_count_and_cache_bytes_match_closed_form(spec, n_producers, tied):
    model = tiny(spec, tie_embeddings=tied)
    ff = model.config.intermediate_size
    assert model.num_params() == closed_form_params(97, 6, 32, 4, 2, ff, n_producers, tied)
    model.setup_cache(batch_size=2, max_len=24)
    assert model.kv_cache.nbytes == 2 * n_producers * 2 * 24 * 2 * 8 * 4  # K,V x producers x B x S x KVH x hd x fp32
    assert model.kv_cache.nbytes == kv_cache_bytes(model.config, 2, 24, bytes_per_element=4)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_echo_cache_is_exact_fraction_of_baseline(n):
    base, echo = ModelConfig(n_layer=6), ModelConfig(n_layer=6, kv_share=f"echo:{n}")
    assert kv_cache_bytes(echo, 4, 100) * 6 == kv_cache_bytes(base, 4, 100) * (6 - n)


def test_gradient_reaches_producer_kv_through_consumers():
    # Silence the producer's own attention output, so its K/V can only affect the loss through consumers.
    for spec, expect_grad in [("echo:2", True), ("none", False)]:
        model = tiny(spec).train()
        with torch.no_grad():
            model.layers[3].attention.wo.weight.zero_()
        idx = torch.randint(0, 97, (2, 16))
        _, loss, _ = model(idx, targets=idx)
        loss.backward()
        grad = model.layers[3].attention.wk.weight.grad
        assert (grad.abs().sum() > 0) == expect_grad, spec


def test_flops_count_only_the_kv_projections_that_exist():
    base, echo = ModelConfig(n_layer=6), ModelConfig(n_layer=6, kv_share="echo:3")
    kv_proj = 2 * base.n_embd * base.n_kv_head * base.head_dim
    assert training_flops_per_token(base, 256) - training_flops_per_token(echo, 256) == 6 * 3 * kv_proj
    model = LLaMA(echo)
    # attention scores are still computed in all 6 layers
    assert training_flops_per_token(model.config, 256) - training_flops_per_token(model.config, 128) == 12 * 6 * echo.n_head * echo.head_dim * 128


@pytest.mark.parametrize("spec,match", [
    ("echo:0", "between 1 and n_layer-1"),
    ("echo:6", "between 1 and n_layer-1"),
    ("echo:x", "needs a whole number"),
    ("cla:0", "between 1 and n_layer"),
    ("cla:", "needs a whole number"),
    ("0,0,2", "lists 3 layers but the model has n_layer=6"),
    ("0,2,2,2,2,2", "layer 1 reads layer 2"),
    ("0,0,1,1,1,1", "which is itself a consumer"),
    ("-1,0,0,0,0,0", "a source must be in 0..0"),
    ("half", "expected 'none', 'echo:N'"),
])
def test_bad_kv_share_spec_raises(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_sources(spec, 6)
    with pytest.raises(ValueError, match=match):
        LLaMA(ModelConfig(n_layer=6, n_embd=32, n_head=4, vocab_size=10, kv_share=spec))


def test_bad_head_counts_raise():
    with pytest.raises(ValueError, match="n_head=6 is not divisible by n_kv_head=4"):
        ModelConfig(n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="not divisible by n_head"):
        ModelConfig(n_embd=100, n_head=6)
    with pytest.raises(ValueError, match="unknown model config key"):
        config_from_dict({"n_layers": 3})


def test_loss_at_init_is_close_to_uniform():
    model = tiny("echo:3", vocab_size=512)
    idx, targets = torch.randint(0, 512, (2, 8, 32))  # independent targets: no token predicts itself
    _, loss, _ = model(idx, targets=targets)
    assert abs(loss.item() - math.log(512)) < 0.05


def test_sequence_longer_than_block_is_rejected():
    with pytest.raises(ValueError, match="exceeds block_size=32"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the context window"):
        generate(tiny(), torch.zeros(1, 33, dtype=torch.long), 1)


def test_decoding_before_setup_cache_is_one_clear_error():
    with pytest.raises(UsageError, match=r"input_pos given but there is no KV cache: call model.setup_cache"):
        tiny()(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))


def test_the_documented_spec_examples_are_exact():
    """Every example of the spec grammar that the docs show (resolve_sources' docstring, the guide's table,
    6 layers) resolves to exactly the sources they print, a partial top group of cla:G included."""
    import re
    from conftest import ROOT
    expected = {"none": [0, 1, 2, 3, 4, 5], "echo:2": [0, 1, 2, 3, 3, 3], "echo:3": [0, 1, 2, 2, 2, 2],
                "cla:2": [0, 0, 2, 2, 4, 4], "cla:4": [0, 0, 0, 0, 4, 4], "0,0,2,2,2,5": [0, 0, 2, 2, 2, 5]}
    for spec, sources in expected.items():
        assert resolve_sources(spec, 6) == sources, spec
    doc = dict(re.findall(r"(\S+)\s+-> (\[[\d, ]+\])", resolve_sources.__doc__))
    readme = dict(re.findall(r"^\| `([^`]+)` \| `(\[[\d, ]+\])` \|", open(os.path.join(ROOT, "docs", "GUIDE.md")).read(), re.M))
    assert set(doc) == {"none", "echo:2", "cla:2", "cla:4", "0,0,2,2,2,5"} and "cla:4" in readme and len(readme) >= 5
    for spec, shown in {**doc, **readme}.items():
        assert resolve_sources(spec, 6) == expected[spec] == eval(shown), spec


def test_a_full_pass_attends_explicitly_only_on_a_cpu_in_half_precision_at_short_blocks():
    from model import explicit_is_faster
    assert explicit_is_faster("cpu", torch.bfloat16, 512) and explicit_is_faster("cpu", torch.float16, 3)
    assert not explicit_is_faster("cpu", torch.bfloat16, 513) and not explicit_is_faster("cpu", torch.float32, 64)
    assert not explicit_is_faster("cuda", torch.bfloat16, 64)  # a GPU keeps SDPA's flash kernel


@pytest.mark.parametrize("spec", ["kv=0,1,1,3,3", "att=0,1,1,3,1", "kv=0,0,2,2,4 att=0,1,2,3,2"])
def test_explicit_attention_equals_sdpa_under_bf16(spec, monkeypatch):
    """The CPU's bf16 shortcut (attend_explicit with a causal mask) against SDPA's causal kernel: logits and every
    gradient equal within bf16's rounding, with GQA and both sharing kinds, at a block that is no power of two."""
    import model as model_module
    from bench import variant_sharing
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=61, block_size=32, n_layer=5, n_head=6, n_kv_head=2, n_embd=48,
                              **variant_sharing(spec)))
    idx = torch.randint(0, 61, (2, 27))
    results = []
    for explicit in (True, False):
        monkeypatch.setattr(model_module, "explicit_is_faster", lambda device_type, dtype, T: explicit)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss, _ = model(idx, idx)
        loss.backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=3e-2 * gb.abs().max().item(), rtol=0)
