"""EchoAtt's attention sharing (att_share): an attention consumer computes softmax(q_src k_src^T / sqrt(d)) v_own
with its source's rotated queries and keys, has no wq/wk and no K slot, and converts, trains and distils."""
import math

import pytest
import torch

from conftest import read_log, run
from echo.checkpoint import load_checkpoint
from echo.conversion import convert_sharing
from model import LLaMA, ModelConfig, UsageError, apply_rope, resolve_sharing
from echo.costs import kv_cache_bytes, matmul_params

MIXED = [  # (kv_share, att_share) on 5 layers: attention sharing alone, and mixed with K/V sharing
    ("none", "0,0,2,2,2"),
    ("none", "echo:2"),
    ("0,1,1,3,4", "0,1,2,3,2"),  # layer 4 reuses layer 2's attention; layer 2 itself reads layer 1's K/V
    ("0,0,2,2,4", "0,1,2,3,1"),  # layer 4 reuses 1's attention (1 reads 0's K/V), 3 reads 2's K/V
]


def model_of(kv_share, att_share, n_kv_head=2, n_head=6, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=71, block_size=29, n_layer=5, n_head=n_head, n_kv_head=n_kv_head, n_embd=60,
               intermediate_size=50, kv_share=kv_share, att_share=att_share)
    return LLaMA(ModelConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("kv_share,att_share", MIXED)
@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["gqa", "mqa"])
def test_an_attention_consumer_computes_its_sources_pattern_with_its_own_values(kv_share, att_share, n_kv_head):
    model = model_of(kv_share, att_share, n_kv_head)
    inputs = {}  # each layer's attention input (the normed residual stream) and output
    hooks = [layer.attention.register_forward_hook(
        lambda m, args, out, i=i: inputs.__setitem__(i, (args[0], out[0]))) for i, layer in enumerate(model.layers)]
    idx = torch.randint(0, 71, (2, 13))
    with torch.no_grad():
        model(idx, all_logits=True)
    for h in hooks:
        h.remove()
    cos, sin = model.rope_cos[:13], model.rope_sin[:13]
    hd, G = model.config.head_dim, model.config.n_head // n_kv_head

    def heads(x, w, n):  # (B, T, C) @ w -> (B, n, T, hd)
        return (x @ w.weight.T).view(2, 13, n, hd).transpose(1, 2)

    def key_layer(i):  # the layer whose wk layer i's keys come from
        return model.kv_sources[model.att_sources[i]]

    for i, src in enumerate(model.att_sources):
        if src == i:
            continue
        att = model.layers[i].attention
        assert not hasattr(att, "wq") and not hasattr(att, "wk") and hasattr(att, "wv")
        q = apply_rope(heads(inputs[src][0], model.layers[src].attention.wq, 6), cos, sin)
        k = apply_rope(heads(inputs[key_layer(i)][0], model.layers[key_layer(i)].attention.wk, n_kv_head), cos, sin)
        v = heads(inputs[i][0], att.wv, n_kv_head)                                   # its own values
        scores = q @ k.repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(hd)      # (B, H, T, T)
        scores = scores.masked_fill(~torch.ones(13, 13, dtype=torch.bool).tril(), float("-inf"))
        y = scores.softmax(-1) @ v.repeat_interleave(G, 1)                          # (B, H, T, hd)
        expected = att.wo(y.transpose(1, 2).reshape(2, 13, 6 * hd))
        torch.testing.assert_close(inputs[i][1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_share,att_share", MIXED)
@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["gqa", "mqa"])
def test_cached_prefill_and_decode_equal_the_full_pass(kv_share, att_share, n_kv_head):
    model = model_of(kv_share, att_share, n_kv_head)
    idx = torch.randint(0, 71, (3, 23))
    with torch.no_grad():
        full, _, _ = model(idx, all_logits=True)
        model.setup_cache(3, 27)
        parts = [model(idx[:, :8], input_pos=torch.arange(8), all_logits=True)[0],
                 model(idx[:, 8:19], input_pos=torch.arange(8, 19), all_logits=True)[0]]
        parts += [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(19, 23)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # the cache holds a K slot per layer computing keys and a V slot per layer computing values, nothing more
    kv, att = model.kv_sources, model.att_sources
    n_k, n_v = sum(kv[i] == i and att[i] == i for i in range(5)), sum(kv[i] == i for i in range(5))
    assert model.kv_cache.n_slots == {"k": n_k, "v": n_v}
    assert model.kv_cache.nbytes == kv_cache_bytes(model.config, 3, 27, 4) == (n_k + n_v) * 3 * 27 * n_kv_head * 10 * 4


def test_weights_follow_what_each_layer_computes():
    keys = model_of("0,1,1,3,4", "0,1,2,3,2").state_dict().keys()
    has = lambda i, w: f"layers.{i}.attention.{w}.weight" in keys  # noqa: E731
    assert [(has(i, "wq"), has(i, "wk"), has(i, "wv"), has(i, "wo")) for i in range(5)] == [
        (True, True, True, True), (True, True, True, True), (True, False, False, True),   # 2 reads 1's K/V
        (True, True, True, True), (False, False, True, True)]                            # 4 reuses 2's attention


@pytest.mark.parametrize("kv_share,att_share,match", [
    ("echo:1", "echo:1", "layer 4 reads layer 3's K/V and layer 3's attention: a layer reads from other layers at most one kind"),
    ("0,1,2,2,4", "0,1,1,3,4", "layer 3 reads layer 2's K/V, but layer 2 reuses layer 1's attention"),
    ("none", "0,0,1,3,4", "att_share '0,0,1,3,4': layer 2 reads layer 1, which is itself a consumer"),
    ("none", "echo:5", "att_share 'echo:5': N must be between 1 and n_layer-1 = 4"),
    ("none", "0,1,3,3,4", "att_share '0,1,3,3,4': layer 2 reads layer 3, but a source must be in 0..2"),
])
def test_bad_combinations_are_one_line_each(kv_share, att_share, match):
    with pytest.raises(UsageError, match=match):
        model_of(kv_share, att_share)


def tinyllama(att_share):
    """TinyLlama-1.1B's shape (untied, GQA 32/4, 5632 MLP), on the meta device: no memory is allocated."""
    with torch.device("meta"):
        return LLaMA(ModelConfig(vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
                                 intermediate_size=5632, tie_embeddings=False, att_share=att_share))


def test_tinyllama_parameters_removed_match_echoatt_table_3():
    base = tinyllama("none").num_params()
    assert base == 1_100_048_384
    for n, removed in [(5, 23.59e6), (9, 42.47e6), (17, 80.22e6)]:
        model = tinyllama(f"echo:{n}")
        assert base - model.num_params() == n * (2048 * 2048 + 2048 * 256)  # wq + wk of each sharing layer
        assert round((base - model.num_params()) / 1e4) * 1e4 == removed


def test_tinyllama_matmul_weights_and_cache_bytes():
    # matmul_params counts what the layers compute: the embedding table is a lookup, norms are not matmuls
    for n in (0, 5, 17):
        model = tinyllama(f"echo:{n}" if n else "none")
        norms = (2 * 22 + 1) * 2048
        assert matmul_params(model.config) == model.num_params() - 32000 * 2048 - norms
        # attention sharing keeps every layer's V slot and drops only the K slots of its consumers
        assert kv_cache_bytes(model.config, 1, 1, 2) == (22 - n + 22) * 4 * 64 * 2


def test_converting_keeps_everything_but_the_dropped_projections():
    base = model_of("none", "none")
    att = convert_sharing(base, att_share="0,0,2,2,2")
    old, new = base.state_dict(), att.state_dict()
    dropped = {f"layers.{i}.attention.{w}.weight" for i in (1, 3, 4) for w in ("wq", "wk")}
    assert set(old) - set(new) == dropped and set(new) <= set(old)
    assert all(torch.equal(old[k], new[k]) for k in new)
    # back to no sharing: each layer takes the projections it used, its source's
    back = convert_sharing(att, att_share="none").state_dict()
    for i, s in [(1, 0), (3, 2), (4, 2)]:
        for w in ("wq", "wk"):
            assert torch.equal(back[f"layers.{i}.attention.{w}.weight"], old[f"layers.{s}.attention.{w}.weight"])
    assert resolve_sharing(att.config) == ([0, 1, 2, 3, 4], [0, 0, 2, 2, 2])


def test_one_shot_conversion_with_distillation_and_hidden_states(data_dir, pretrained, tmp_path):
    run(data_dir, tmp_path, init_from=f"ckpt:{pretrained}", att_share="echo:2", max_iters=6, log_interval=1,
        distill_alpha=0.25, distill_hidden=0.25)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["model_args"]["att_share"] == "echo:2" and ckpt["model_args"]["kv_share"] == "none"
    assert not any(".2.attention.wq" in k or ".3.attention.wk" in k for k in ckpt["model"])
    lines = [r for r in read_log(tmp_path) if "loss" in r]
    assert all(r["hidden"] > 0 and r["kd"] > 0 for r in lines)
    # the logged loss is the mix: 0.5 CE + 0.25 KL + 0.25 MSE of the residual stream after layer 3
    for r in lines:
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.25 * r["kd"] + 0.25 * r["hidden"], rel=1e-5)


def test_hidden_term_compares_the_residual_stream_after_each_shared_block():
    from echo.distill import compared_layers, hidden_loss
    student = convert_sharing(model_of("none", "none", n_layer=6), att_share="0,0,2,2,2,5")
    assert compared_layers(student) == (1, 4)
    assert compared_layers(model_of("echo:2", "none", n_layer=6)) == (5,)
    assert compared_layers(model_of("0,1,1,3,4,5", "0,1,2,3,3,3", n_layer=6)) == (2, 5)
    assert compared_layers(model_of("none", "none")) == ()
    idx = torch.randint(0, 71, (2, 9))
    teacher_model = model_of("none", "none", n_layer=6)
    _, _, hs = student(idx, hidden_at=(1, 4))
    _, _, ht = teacher_model(idx, hidden_at=(1, 4))
    # the residual stream after layer i is what the next layer takes in
    seen = []
    hook = teacher_model.layers[5].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    _, _, last = teacher_model(idx, hidden_at=(4,))
    hook.remove()
    torch.testing.assert_close(last[0], seen[0])
    expected = (((hs[0] - ht[0]) ** 2).mean() + ((hs[1] - ht[1]) ** 2).mean()) / 2
    torch.testing.assert_close(hidden_loss(hs, ht), expected)
    assert hidden_loss([], []) == 0



def test_swiftkvs_hidden_term_compares_what_the_last_layer_reads():
    """distill_hidden_at='before_last': one stream, the last layer's input, whatever shares; a student that differs
    from its teacher only in its last layer (it reads layer 3's K/V) has no loss there, while EchoAtt's placement
    (after the group 3-4) sees the difference."""
    from echo.distill import compared_layers, hidden_loss
    teacher = model_of("none", "none", n_layer=5)
    student = convert_sharing(model_of("none", "none", n_layer=5), kv_share="0,1,2,3,3")
    for m in (teacher, student, model_of("echo:2", "none"), model_of("0,1,1,3,4", "0,1,2,3,3")):
        assert compared_layers(m, "before_last") == (3,)
    seen = []
    hook = student.layers[4].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    idx = torch.randint(0, 71, (3, 11))
    _, _, (hs,) = student(idx, hidden_at=compared_layers(student, "before_last"))
    hook.remove()
    torch.testing.assert_close(hs, seen[0])
    _, _, (ht,) = teacher(idx, hidden_at=(3,))
    assert hidden_loss([hs], [ht]) == 0
    groups = compared_layers(student)
    assert groups == (4,) and hidden_loss(student(idx, hidden_at=groups)[2], teacher(idx, hidden_at=groups)[2]) > 0

def test_layer_wise_conversion_resumes_mid_schedule_exactly(data_dir, pretrained, tmp_path):
    conv = dict(init_from=f"ckpt:{pretrained}", att_share_target="0,0,0,0", adapt_iters=3, max_iters=12,
                lr_decay_iters=12, eval_interval=2, distill_alpha=0.5)
    run(data_dir, tmp_path / "full", **conv)
    run(data_dir, tmp_path / "half", **dict(conv, max_iters=4))       # stops inside stage 1
    run(data_dir, tmp_path / "half", init_from="resume", max_iters=12, lr_decay_iters=12, eval_interval=2)
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(tmp_path / "half" / "ckpt.pt")
    assert a["model_args"]["att_share"] == "0,0,0,0" and a["stage"] == b["stage"] == 3
    assert [st["att_sources"] for st in a["adapt_stages"]] == [[0, 1, 2, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-6)
    evals = [(r["iter"], r["att_sources"]) for r in read_log(tmp_path / "full") if "val_loss" in r]
    assert evals[1] == (2, [0, 1, 2, 0]) and evals[-1] == (12, [0, 0, 0, 0])


def test_frozen_stages_train_the_converted_layers_and_what_they_read():
    from echo.conversion import adaptation_stages, enter_stage
    model = model_of("none", "none", n_layer=4)
    stages = adaptation_stages({"kv_sources": model.kv_sources, "att_sources": model.att_sources},
                               att_target="0,1,1,1", trainable="stages:layers")
    assert [st["trainable"] for st in stages] == ["layers", "layers", "all"]
    model = enter_stage(model, stages[0], "keep")  # layer 3 reuses layer 1's attention
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in model.named_parameters() if n.startswith("layers.3.")} | {
        "layers.1.attention.wq.weight", "layers.1.attention.wk.weight"}


def test_legacy_checkpoint_stages_still_resume():
    from echo.conversion import legacy_stages
    old = [[0, 1, 2, 2], [0, 1, 1, 1]]  # what a checkpoint stored before attention sharing
    stages = legacy_stages(old, 4, "stages:layers")  # the run's trainable, as resume_checkpoint restores it
    assert [st["kv_sources"] for st in stages] == [[0, 1, 2, 2], [0, 1, 1, 1], [0, 1, 1, 1]]
    assert [st["trainable"] for st in stages] == ["layers", "layers", "all"]
    assert all(st["att_sources"] == [0, 1, 2, 3] for st in stages)
    assert legacy_stages(stages, 4, "all") is stages
    flagged = [dict(st, freeze=True) for st in old_dicts(stages[:-1])] + old_dicts(stages[-1:])  # before `trainable`
    assert [st["trainable"] for st in legacy_stages(flagged, 4, "attention")] == ["attention"] * 3


def old_dicts(stages):
    """Stages as a checkpoint stored them between attention sharing and `trainable`: a "freeze" flag each."""
    return [{"kv_sources": st["kv_sources"], "att_sources": st["att_sources"], "freeze": False} for st in stages]


def test_without_a_target_there_is_one_stage_whatever_the_model_shares():
    from echo.conversion import adaptation_stages
    start = {"kv_sources": [0, 1, 1, 3], "att_sources": [0, 1, 2, 0]}
    assert adaptation_stages(start) == [dict(start, trainable="all")]
    assert adaptation_stages(start, trainable="attention") == [dict(start, trainable="attention")]


def test_hidden_distillation_needs_a_teacher_of_the_same_depth(data_dir, pretrained, tmp_path):
    run(data_dir, tmp_path / "two", n_layer=2, max_iters=2)
    with pytest.raises(UsageError, match=r"distill_hidden compares residual streams layer by layer, but the teacher "
                                         r"ckpt:.* has \(n_layer, n_embd\) = \(4, 32\), the student \(2, 32\)"):
        run(data_dir, tmp_path / "s", init_from=f"ckpt:{tmp_path / 'two'}", distill_hidden=0.5,
            distill_from=f"ckpt:{pretrained}", max_iters=2)
