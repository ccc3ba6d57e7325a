"""The performance claims the code makes about itself: its FLOP formula equals torch's FlopCounterMode
(the matmul part: on a CPU the counter does not count SDPA), and the compiled training forward and decode
step are each one whole graph that never recompiles."""
import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import variant_sharing
from echo.generate import cache_len, compile_decode_step, generate_tokens
from model import LLaMA, ModelConfig
from echo.costs import decode_bytes_per_step, matmul_params, training_flops_per_token

SHAPES = [  # (n_head, n_kv_head, tied): MHA, GQA, MQA, tied and untied
    (6, 6, True), (6, 2, False), (6, 3, True), (6, 1, False)]
SPECS = ["none", "echo:2", "cla:2", "cla:4", "0,0,0,3,3", "att=cla:2", "kv=0,1,1,3,4 att=0,1,2,3,2"]


def build(spec, n_head, n_kv_head, tied):
    torch.manual_seed(0)
    return LLaMA(ModelConfig(vocab_size=83, block_size=24, n_layer=5, n_head=n_head, n_kv_head=n_kv_head,
                             n_embd=48, intermediate_size=80, tie_embeddings=tied, **variant_sharing(spec)))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n_head,n_kv_head,tied", SHAPES)
def test_training_flops_formula_equals_the_counter(spec, n_head, n_kv_head, tied):
    model = build(spec, n_head, n_kv_head, tied)
    B, T = 3, 19
    idx = torch.randint(0, 83, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, targets=idx).__getitem__(1).backward()
    cfg = model.config
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T  # SDPA: not counted on a CPU
    assert counter.get_total_flops() / (B * T) == pytest.approx(training_flops_per_token(cfg, T) - attention, rel=1e-9)
    assert counter.get_total_flops() == 6 * matmul_params(cfg) * B * T


@pytest.mark.parametrize("spec", SPECS)
def test_attention_term_equals_the_counter_on_the_math_kernel(spec):
    """The counter skips SDPA's CPU flash kernel but counts its math kernel: there the whole formula holds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = build(spec, 6, 2, False)
    B, T = 2, 17
    idx = torch.randint(0, 83, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, targets=idx)[1].backward()
    assert counter.get_total_flops() == training_flops_per_token(model.config, T) * B * T


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n_head,n_kv_head,tied", SHAPES[:2])
def test_decode_and_prefill_flops_equal_the_counter(spec, n_head, n_kv_head, tied):
    model = build(spec, n_head, n_kv_head, tied).eval()
    cfg = model.config
    model.setup_cache(2, 24)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 11, dtype=torch.long), input_pos=torch.arange(11))
    head = cfg.n_embd * cfg.vocab_size  # the prefill applies the LM head to the last position only
    assert counter.get_total_flops() == 2 * 2 * ((matmul_params(cfg) - head) * 11 + head)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 1, dtype=torch.long), input_pos=torch.tensor([11]))
    # the counter sees no SDPA on a CPU, but it sees the explicit attention of decode-time reuse: an attention
    # source computes scores and mixes values (2 matmuls), each of its consumers only mixes (1 matmul)
    consumers = [i for i, s in enumerate(model.att_sources) if s != i]
    matmuls = 2 * len(set(model.att_sources[i] for i in consumers)) + len(consumers)
    one = 2 * 2 * cfg.n_head * cfg.head_dim * 24  # one attention matmul: 2 sequences, every cached position
    assert counter.get_total_flops() == 2 * 2 * matmul_params(cfg) + matmuls * one


@pytest.mark.parametrize("spec", SPECS)
def test_training_forward_and_decode_step_are_one_graph(spec):
    model = build(spec, 6, 2, False)
    idx = torch.randint(0, 83, (2, 16))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx, targets=idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training_loss's call, the CPU's explicit attention in bf16
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(idx, head=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model.eval().setup_cache(2, 24)
    with torch.no_grad():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(idx[:, :1], input_pos=torch.tensor([5]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_repeated_generation_never_recompiles(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend="eager"))  # guards matter, not codegen
    model = build("echo:2", 6, 2, True).eval()
    torch._dynamo.reset()
    step = compile_decode_step(model, 2, cache_len(model, 5, 12))
    runs = []
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile after the warm-up raises
        for seed in range(3):
            prompt = torch.randint(0, 83, (2, 5), generator=torch.Generator().manual_seed(seed))
            runs.append(torch.cat(list(generate_tokens(model, prompt, 12, temperature=0, step=step)), 1))
            eager = torch.cat(list(generate_tokens(model, prompt, 12, temperature=0)), 1)
            assert torch.equal(runs[-1], eager)
    assert not torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("tied", [True, False])
def test_inference_layout_changes_strides_only(tied):
    from echo.generate import inference_layout
    model = build("echo:2", 6, 2, tied).eval()
    idx = torch.randint(0, 83, (2, 9))
    before = model(idx, all_logits=True)[0]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    inference_layout(inference_layout(model))  # idempotent
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.stride() == (1, m.weight.size(0))  # (in, out)-contiguous
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    torch.testing.assert_close(model(idx, all_logits=True)[0], before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", SPECS + ["att=0,1,1,3,1", "kv=0,0,2,3,4 att=0,1,2,1,1"])
@pytest.mark.parametrize("n_head,n_kv_head,tied", SHAPES)
def test_decode_bytes_are_what_each_layer_reads(spec, n_head, n_kv_head, tied, monkeypatch):
    """decode_bytes_per_step against the tensors a decode step really hands to attention: every K and V each
    layer attends over (a K/V consumer's read of its producer's slots counts again), the probabilities an
    attention consumer mixes instead of keys, plus the weights (of an untied embedding, only the B rows)."""
    import model as model_module
    model = build(spec, n_head, n_kv_head, tied).eval()
    reads, inside = [], []

    def spy(name, *tensors):
        real = getattr(model_module, name)

        def counted(*args):
            if not inside:  # attend_explicit mixes through mix_values: count its reads once
                reads.append(sum(args[i].nbytes for i in tensors))
            inside.append(name)
            try:
                return real(*args)
            finally:
                inside.pop()
        monkeypatch.setattr(model_module, name, counted)

    spy("attend_masked", 1, 2)   # (q, k, v, mask): reads k and v
    spy("attend_explicit", 1, 2)  # (q, k, v, mask): reads k and v, computes the probabilities it hands up
    spy("mix_values", 0, 1)      # (probs, v, n_head): reads the source's probabilities and its own v
    B, S = 3, 23
    model.setup_cache(B, S)
    with torch.no_grad():
        model(torch.zeros(B, 1, dtype=torch.long), input_pos=torch.tensor([9]))
    assert len(reads) == model.config.n_layer
    weights = sum(p.nbytes for p in model.parameters()) - (0 if tied else model.tok_embeddings.weight.nbytes
                                                           - B * model.tok_embeddings.weight[0].nbytes)
    assert decode_bytes_per_step(model.config, B, S, 4) == weights + sum(reads)
