"""Checks that need a real GPU; skipped without one. Run them where you train: pytest -q tests/test_cuda.py"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from echo.generate import cache_len, compile_decode_step, generate, generate_tokens, inference_layout
from model import LLaMA, ModelConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_model(spec, n_head=8, n_kv_head=2, att_share="none"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, block_size=128, n_layer=4, n_head=n_head, n_kv_head=n_kv_head, n_embd=256,
                      kv_share=spec, att_share=att_share)
    return LLaMA(cfg).cuda().to(torch.bfloat16).eval()


@pytest.mark.parametrize("spec", ["none", "echo:2", "cla:2"])
@pytest.mark.parametrize("n_kv_head", [8, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cached_attention_never_falls_back_to_the_math_kernel(spec, n_kv_head):
    model = gpu_model(spec, n_kv_head=n_kv_head)
    idx = torch.randint(0, 256, (2, 40), device="cuda")
    with torch.no_grad():
        full, _, _ = model(idx, all_logits=True)
        # without MATH a fallback raises instead of running slowly
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            model(idx, all_logits=True)  # the training path (flash)
            model.setup_cache(2, 64)
            pre, _, _ = model(idx[:, :30], input_pos=torch.arange(30, device="cuda"), all_logits=True)
            steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t], device="cuda"))[0] for t in range(30, 40)]
    torch.testing.assert_close(torch.cat([pre] + steps, 1), full, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("kv_share,att_share", [("echo:2", "none"), ("none", "echo:2")])
def test_compiled_decode_in_decodings_layout_equals_eager(kv_share, att_share):
    model = gpu_model(kv_share, att_share=att_share)
    with torch.no_grad():
        model.output.weight.mul_(8)
    idx = torch.randint(0, 256, (2, 7), device="cuda")
    eager = generate(model, idx, 40, temperature=0)
    inference_layout(model)  # as sample.py decodes: q|k|v and w1|w3 each one matrix (fewer launches in the CUDA graph)
    step = compile_decode_step(model, 2, cache_len(model, 7, 40))
    compiled = torch.cat([idx] + list(generate_tokens(model, idx, 40, temperature=0, step=step)), 1)
    assert (compiled == eager).float().mean() > 0.95  # bf16: an exact tie may rarely flip


def test_compiled_bf16_training_step_close_to_eager():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, block_size=128, n_layer=4, n_head=8, n_kv_head=2, n_embd=256, kv_share="echo:2")
    model = LLaMA(cfg).cuda()
    idx = torch.randint(0, 256, (4, 128), device="cuda")
    losses, grads = [], []
    for fn in (model, torch.compile(model)):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(idx, targets=idx.roll(-1, 1))[1]
        loss.backward()
        losses.append(loss.item())
        grads.append(model.layers[1].attention.wk.weight.grad.clone())
    assert abs(losses[0] - losses[1]) < 1e-2
    torch.testing.assert_close(grads[0], grads[1], atol=1e-2, rtol=0.1)


def test_stopping_at_end_tokens_syncs_every_16_steps_only():
    """Asking whether every row has ended waits for the GPU: generation asks every 16 tokens, not every token
    (the interval itself is checked on the CPU in test_chat.py)."""
    import warnings
    model = gpu_model("none")
    idx = torch.randint(0, 256, (2, 8), device="cuda")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in generate_tokens(model, idx, 48, temperature=0, stop={300}):  # an id never sampled
                pass
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 48 // 16 + 2, [str(w.message) for w in syncs]  # the 3 checks, and at most prefill's own


def test_teacher_text_is_written_on_the_gpu():
    """data/teacher_text/prepare.py --device=cuda: the batch is sampled where the model is, and each document is its
    opening, then what the model wrote up to and including its first end token (or, cut, followed by one)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "data", "teacher_text", "prepare.py")
    spec = importlib.util.spec_from_file_location("teacher_text", path)
    teacher_text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(teacher_text)
    model = gpu_model("echo:2").float()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]  # unequal lengths; 7 inside a prompt is not an end
    torch.manual_seed(0)
    docs = teacher_text.write_documents(model, prompts, 40, [7], 0, 256, 0.95)
    for p, doc in zip(prompts, docs):
        assert doc[:len(p)] == p and len(p) < len(doc) <= len(p) + 41
        assert 7 not in doc[len(p):-1] and (doc[-1] == 7 or len(doc) == len(p) + 41 and doc[-1] == 0)
