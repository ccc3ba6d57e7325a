import json
from types import SimpleNamespace

import pytest
import torch

from bench import Variant, measure_distill, parse, variant_sharing
from conftest import run_script
from model import LLaMA, ModelConfig
from echo.costs import decode_bytes_per_step, kv_cache_bytes, training_flops_per_token


def test_quick_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--quick=True", "--rounds=1", "--naive=True", "--peak_bytes=1e10", f"--json={out}",
                   "--dtype=float32")  # the byte counts below are fp32's, whatever this CPU's default
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert {"device", "torch", "config", "results"} <= set(report)
    cfg, results = report["config"], report["results"]
    assert list(results) == ["none", "echo:2", "echo:4", "cla:2", "att=echo:2"] and cfg["n_layer"] == 8
    shape = ModelConfig(**{k: cfg[k] for k in ModelConfig.__dataclass_fields__ if not k.endswith("_share")})
    base = results["none"]
    for spec, res in results.items():
        kv, att = res["kv_sources"], res["att_sources"]
        n_v = sum(kv[i] == i for i in range(8))                     # layers computing V (and caching it)
        n_k = sum(kv[i] == i and att[i] == i for i in range(8))     # layers computing K
        n_q = sum(att[i] == i for i in range(8))                    # layers computing q
        assert res["kv_bytes_per_token"] == (n_k + n_v) * cfg["n_kv_head"] * shape.head_dim * 4  # fp32
        assert res["kv_bytes_per_token"] / base["kv_bytes_per_token"] == (n_k + n_v) / 16
        assert res["flops_per_token"] == training_flops_per_token(ModelConfig(**{**shape.__dict__, **variant_sharing(spec)}),
                                                                  cfg["block_size"])
        assert res["baseline_flops_per_token"] == base["flops_per_token"]
        for key in ("train_tok_s", "train_ms_per_iter", "prefill_tok_s_b1_short", "decode_tok_s_b1_short",
                    "decode_tok_s_b4_long", "naive_decode_tok_s_b1_short"):
            assert res[key] > 0, key
        # MFU against the matmul peak measured on this CPU; MBU against the peak given on the command line
        assert res["mfu"] == pytest.approx(res["flops_per_token"] * res["train_tok_s"] / report["peaks"]["peak_flops"])
        for batch, context, prompt in [(1, "short", 16), (4, "long", 128 - 16)]:
            name = f"b{batch}_{context}"
            # closed form: fp32 weights read once (tied head, so no embedding rows apart), 2 norms a layer + the
            # final one, and per layer a V slot and a K slot over the whole cache (prompt + 16 decoded tokens),
            # where an attention consumer reads its source's probabilities (n_head per position) for the keys
            d, ff, hd = cfg["n_embd"], shape.intermediate_size, shape.head_dim
            weights = 8 * (d * d + 3 * d * ff) + n_q * d * d + (n_k + n_v) * d * cfg["n_kv_head"] * hd + d * 512 + 17 * d
            per_position = (8 + n_q) * cfg["n_kv_head"] * hd + (8 - n_q) * cfg["n_head"]
            step = 4 * weights + 4 * batch * (prompt + 16) * per_position
            assert res[f"decode_bytes_per_token_{name}"] == step / batch
            assert res[f"decode_mbu_{name}"] == pytest.approx(step / batch * res[f"decode_tok_s_{name}"] / 1e10)
    assert report["peaks"]["flops"].startswith("measured ") and report["peaks"]["bytes"] == "given 10 GB/s"
    assert "MFU against: measured" in r.stdout and "MBU against: given 10 GB/s" in r.stdout
    assert kv_cache_bytes(shape, 1, 1, 4) == base["kv_bytes_per_token"]
    assert "ratio" not in r.stdout and "(0.50x)" in r.stdout  # the table prints ratios to the baseline


def test_bad_preset_is_one_line():
    r = run_script("bench.py", "--preset=huge")
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown preset 'huge': choose from tiny, shakespeare, gpt2-small, tinyllama, smollm2"


def test_decode_against_context(tmp_path):
    """parts=context: decode speed at each cached length, for batch 1 and the larger batch; the bytes a step
    reads (weights + every K and V slot over context + decode_tokens positions) behind each GB/s figure;
    a cache that does not fit the window is one line; the plot is written."""
    out, png = tmp_path / "ctx.json", tmp_path / "ctx.png"
    args = ["bench.py", "--parts=context", "--contexts=5,40,100", "--decode_tokens=7", "--rounds=1",
            "--decode_batch=3", "--variants=none;echo:3;att=echo:5", f"--json={out}", f"--plot={png}", "--dtype=float32"]
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    cfg = report["config"]
    shape = ModelConfig(**{k: cfg[k] for k in ModelConfig.__dataclass_fields__ if not k.endswith("_share")})
    for spec, res in report["results"].items():
        model_cfg = ModelConfig(**{**shape.__dict__, **variant_sharing(spec)})
        for batch in (1, 3):
            for c in (5, 40, 100):
                tok_s = res[f"ctx_decode_tok_s_b{batch}_{c}"]
                step = decode_bytes_per_step(model_cfg, batch, c + 7, 4)
                assert tok_s > 0 and res[f"ctx_decode_gb_s_b{batch}_{c}"] == pytest.approx(step / batch * tok_s / 1e9)
        assert "train_tok_s" not in res and "decode_tok_s_b1_short" not in res  # only the part asked for
    assert "decode tok/s b3 ctx 100" in r.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_script(*args[:2], "--contexts=5,125", "--decode_tokens=7")
    assert r.returncode == 1 and r.stderr.strip() == ("error: contexts: 125 is out of range: each must be 1 to "
                                                      "block_size - decode_tokens = 121")


def test_decode_at_a_fixed_cache_budget(tmp_path):
    """parts=capacity: each variant decodes at the largest batch whose KV cache fits the budget (counted from
    the slots it really caches), so K/V sharing fits more sequences; bad budgets and plots are one line."""
    out, png = tmp_path / "cap.json", tmp_path / "cap.png"
    args = ["bench.py", "--parts=capacity", "--contexts=9,50", "--cache_budget=0.0002,0.0011", "--dtype=float32",
            "--decode_tokens=5", "--rounds=1", "--variants=none;echo:5;att=echo:3", f"--json={out}", f"--plot={png}"]
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    cfg, results = report["config"], report["results"]
    for spec, res in results.items():
        kv, att = res["kv_sources"], res["att_sources"]
        slots = sum(kv[i] == i for i in range(8)) + sum(kv[i] == i and att[i] == i for i in range(8))  # V + K slots
        for gib in (0.0002, 0.0011):
            for c in (9, 50):
                per_sequence = slots * (c + 5) * cfg["n_kv_head"] * (cfg["n_embd"] // cfg["n_head"]) * 4  # fp32
                assert res[f"cap_batch_{gib}_{c}"] == int(gib * 2**30) // per_sequence
                assert (res[f"cap_tok_s_{gib}_{c}"] > 0) == (res[f"cap_batch_{gib}_{c}"] > 0)
    # echo:5 keeps 3 of 8 layers' K/V: 8/3 as many sequences fit (rounded down: 6 against 2)
    assert results["echo:5"]["cap_batch_0.0011_50"] == 3 * results["none"]["cap_batch_0.0011_50"] == 6
    assert results["none"]["cap_batch_0.0002_50"] == 0 and results["echo:5"]["cap_batch_0.0002_50"] == 1
    assert "batch in 0.0011 GiB ctx 50" in r.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad, match in [("--cache_budget=0", "cache_budget='0': expected GiB > 0"),
                       ("--cache_budget=a,1", "cache_budget='a,1': expected GiB > 0"),
                       ("--parts=context,capacity", "--plot draws the context or the capacity measurements")]:
        r = run_script(*args[:2], "--contexts=9", bad, f"--plot={png}")
        assert r.returncode == 1 and r.stderr.strip().startswith(f"error: {match}"), r.stderr


def test_conversion_step_split(tmp_path):
    """parts=distill: a conversion step timed in parts, as train.py runs it with the KD-only loss. The teacher
    is the unconverted model (its forward counted in the step's FLOPs as a third of its training step's); the
    student's share is the step's forward and backward less the teacher's forward; only this part is run."""
    out = tmp_path / "distill.json"
    r = run_script("bench.py", "--parts=distill", "--rounds=1", "--train_steps=2", "--warmup_steps=1", "--block_size=48",
                   "--variants=none;echo:3;att=0,1,1,3,3,5,6,6", f"--json={out}")
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    cfg = report["config"]
    shape = ModelConfig(**{k: cfg[k] for k in ModelConfig.__dataclass_fields__ if not k.endswith("_share")})
    teacher_flops = training_flops_per_token(shape, 48) / 3
    for spec, res in report["results"].items():
        step = res["distill_fwd_bwd_ms"] + res["distill_optimizer_ms"]
        assert res["distill_step_ms"] == pytest.approx(step)
        assert res["distill_student_ms"] == pytest.approx(res["distill_fwd_bwd_ms"] - res["distill_teacher_ms"])
        assert res["distill_teacher_share"] == pytest.approx(res["distill_teacher_ms"] / step)
        assert res["distill_tok_s"] == pytest.approx(8 * 48 / (step / 1000))
        student = ModelConfig(**{**shape.__dict__, **variant_sharing(spec)})
        assert res["distill_flops_per_token"] == pytest.approx(training_flops_per_token(student, 48) + teacher_flops)
        assert res["distill_mfu"] == pytest.approx(res["distill_flops_per_token"] * res["distill_tok_s"]
                                                   / report["peaks"]["peak_flops"])
        assert res["eval_forward_ms"] > 0 and "train_tok_s" not in res and "decode_tok_s_b1_short" not in res
    assert "KD: teacher share %" in r.stdout and "KD: student fwd+bwd ms" in r.stdout
    # a context too short for the default prompt + decode is fine above (no decoding), one line where decoding runs
    r = run_script("bench.py", "--parts=distill,inference", "--block_size=48")
    assert r.returncode == 1 and r.stderr.strip() == "error: short_prompt + decode_tokens = 96 exceeds block_size=48"


def test_conversion_step_is_the_training_step():
    """What parts=distill times is a real KD step: the teacher's forward without its head (once alone, once inside
    training_loss, whose chunked loss applies it), the student learns (its weights move) and is left in training
    mode."""
    cfg = parse(["--block_size=24", "--n_layer=4", "--variants=echo:2"])
    variant = Variant(cfg, "echo:2")
    teacher = LLaMA(ModelConfig(**{**variant.model.config.__dict__, "kv_share": "none"})).eval()
    calls = []
    forward = teacher.forward
    teacher.forward = lambda x, *a, **kw: calls.append(kw.get("head")) or forward(x, *a, **kw)
    before = [p.detach().clone() for p in variant.model.parameters()]
    cfg.warmup_steps, cfg.train_steps = 1, 2
    parts = measure_distill(variant, cfg, SimpleNamespace(teacher=teacher))
    assert calls == [False] * 6 and set(parts) == {"distill_teacher_ms", "distill_fwd_bwd_ms",
                                                   "distill_optimizer_ms", "eval_forward_ms"}
    assert all(not torch.equal(a, b) for a, b in zip(before, variant.model.parameters()))
    assert variant.model.training and not any(p.grad is not None for p in variant.model.parameters())
