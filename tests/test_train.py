import os
import subprocess
import sys

import pytest
import torch

from echo.checkpoint import load_checkpoint, save_checkpoint
from configurator import configure
from conftest import ROOT, read_log, run, run_script, tiny_args
import model as model_module
from model import UsageError
from echo.costs import training_flops_per_token
from train import TrainConfig, train

@pytest.mark.parametrize("kv_share", ["none", "echo:1", "cla:2", "0,0,2,2"])
def test_short_run_loss_falls_and_checkpoint_has_no_consumer_kv(data_dir, tmp_path, kv_share):
    run(data_dir, tmp_path, kv_share=kv_share, n_layer=4)
    evals = [r for r in read_log(tmp_path) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    ckpt = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["iter_num"] == 30 and ckpt["meta"]["tokenizer"] == "char"
    sources = model_module.resolve_sources(kv_share, 4)
    for i, s in enumerate(sources):
        assert (f"layers.{i}.attention.wk.weight" in ckpt["model"]) == (s == i)


def test_resume_continues_exactly(data_dir, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    run(data_dir, full, max_iters=20, lr_decay_iters=20, dropout=0.1)
    run(data_dir, half, max_iters=10, lr_decay_iters=20, dropout=0.1)
    run(data_dir, half, max_iters=20, lr_decay_iters=20, dropout=0.1, init_from="resume")
    a, b = load_checkpoint(full / "ckpt.pt"), load_checkpoint(half / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert read_log(full)[-1]["val_loss"] == read_log(half)[-1]["val_loss"]


def test_gradient_accumulation_averages(data_dir, tmp_path):
    # accumulation 2 x batch 4 and accumulation 1 x batch 8 see the same 8 rows: the same update
    run(data_dir, tmp_path / "a", batch_size=4, gradient_accumulation_steps=2, max_iters=3, log_interval=1)
    run(data_dir, tmp_path / "b", batch_size=8, gradient_accumulation_steps=1, max_iters=3, log_interval=1)
    a, b = load_checkpoint(tmp_path / "a" / "ckpt.pt"), load_checkpoint(tmp_path / "b" / "ckpt.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-5)
    la = [r["loss"] for r in read_log(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in read_log(tmp_path / "b") if "loss" in r]
    assert la == pytest.approx(lb, abs=1e-5)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_args": {}})
    real_save = torch.save

    def crash(obj, f):
        real_save({"partial": torch.zeros(1)}, f)  # something reached the disk ...
        raise KeyboardInterrupt                    # ... then the process died

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_args": {}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="corrupt or not a checkpoint"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))
    with pytest.raises(UsageError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("argv,match", [
    (["--n_layers=3"], "unknown config key 'n_layers' in --n_layers=3 \\(did you mean 'n_layer'\\?\\)"),
    (["--n_layer=3.5"], "n_layer=3.5 in --n_layer=3.5: expected int, got float"),
    (["--learning_rate=fast"], "expected float, got str"),
    (["--compile=1"], "expected bool, got int"),
    (["--n_layer"], "expected --key=value \\(n_layer needs a value of type int\\)"),
    (["--no_such_flag"], "unknown config key 'no_such_flag'"),
    (["no_such_config.py"], "config file 'no_such_config.py' not found"),
])
def test_bad_settings_are_rejected(argv, match):
    with pytest.raises(UsageError, match=match):
        configure(TrainConfig(), argv)


def test_a_bare_flag_means_true_and_is_recorded_as_set():
    cfg = configure(TrainConfig(), ["--compile", "--eval_only", "--compile=False"])
    assert (cfg.compile, cfg.eval_only) == (False, True) and cfg.explicit == {"compile", "eval_only"}


def test_settings_apply_in_order(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_layer = 3\nlearning_rate = 1\nkv_share = 'echo:1'\n")
    cfg = configure(TrainConfig(), [str(f), "--n_layer=5", "--kv_share=0,0,2,2,2"])
    assert (cfg.n_layer, cfg.learning_rate, cfg.kv_share) == (5, 1.0, "0,0,2,2,2")
    f.write_text("n_layers = 3\n")
    with pytest.raises(UsageError, match="unknown config key 'n_layers' in .*c.py"):
        configure(TrainConfig(), [str(f)])


def test_cli_errors_are_one_line(data_dir, tmp_path):
    for argv in (["--n_layers=3"], tiny_args(data_dir, tmp_path, dataset="absent"),
                 tiny_args(data_dir, tmp_path, kv_share="echo:9"), tiny_args(data_dir, tmp_path, init_from="resume")):
        r = run_script("train.py", *argv)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ddp_two_processes_gloo(data_dir, tmp_path):
    argv = tiny_args(data_dir, tmp_path, max_iters=10, gradient_accumulation_steps=2, eval_interval=5, dropout=0.1)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *argv], capture_output=True, text=True, cwd=ROOT, timeout=1200,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))  # one thread a rank: 2 ranks, 2 cores
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 processes x 1 accumulation x 4 batch x 32 context" in r.stdout
    assert "terminate called" not in r.stderr
    evals = [x for x in read_log(tmp_path) if "val_loss" in x]
    assert evals[-1]["iter"] == 10 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    states = load_checkpoint(tmp_path / "ckpt.pt")["rng_states"]  # one per rank, each its own dropout stream
    assert len(states) == 2 and not torch.equal(states[0]["cpu"], states[1]["cpu"])


def test_mfu_is_printed_with_the_peak_it_is_against(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path / "a", max_iters=10, log_interval=5)
    logs = [r for r in read_log(tmp_path / "a") if "loss" in r]
    assert all(r["mfu"] > 0 and r["mfu_of"].startswith("measured ") and "float32 matmul" in r["mfu_of"] for r in logs)
    assert f"% of {logs[0]['mfu_of']}" in capsys.readouterr().out
    run(data_dir, tmp_path / "b", max_iters=10, log_interval=5, peak_flops=1e9)
    given = [r for r in read_log(tmp_path / "b") if "loss" in r]
    assert given[-1]["mfu_of"] == "given 1 GFLOP/s" and given[-1]["mfu"] == pytest.approx(
        given[-1]["tokens_per_s"] * training_flops_per_token(
            model_module.ModelConfig(vocab_size=28, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32), 32) / 1e9)
    run(data_dir, tmp_path / "c", max_iters=10, log_interval=5, peak_flops=0.0)
    assert all(r["mfu"] is None for r in read_log(tmp_path / "c") if "loss" in r)


def test_without_always_save_the_checkpoint_is_the_best_eval(data_dir, tmp_path):
    # a learning rate high enough that val loss rises again, so "the best" and "the last" differ
    run(data_dir, tmp_path, always_save_checkpoint=False, learning_rate=0.2, warmup_iters=0, grad_clip=0.0,
        decay_lr=False, max_iters=40, eval_interval=5)
    evals = [r for r in read_log(tmp_path) if "val_loss" in r and r["iter"] > 0]
    best = min(evals, key=lambda r: r["val_loss"])
    assert best["iter"] != evals[-1]["iter"], "the run never got worse: this test would prove nothing"
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["iter_num"] == best["iter"] and ckpt["best_val_loss"] == best["val_loss"]


def test_mfu_while_layers_are_frozen_counts_what_is_computed(data_dir, pretrained, tmp_path):
    """A frozen stage is not MFU-less: its FLOPs per token are those of the stage (frozen weights: no weight
    gradient; layers below every trained weight: no backward), smaller than full fine-tuning's."""
    from echo.checkpoint import load_checkpoint, model_from_checkpoint
    from echo.conversion import adaptation_stages, enter_stage
    run(data_dir, tmp_path, init_from=f"ckpt:{pretrained}", kv_share_target="echo:3", adapt_iters=2,
        trainable="stages:layers", max_iters=8, log_interval=1, eval_interval=8, peak_flops=1e9)
    logs = [r for r in read_log(tmp_path) if "loss" in r]
    model = model_from_checkpoint(load_checkpoint(os.path.join(pretrained, "ckpt.pt")))
    stages = adaptation_stages({"kv_sources": model.kv_sources, "att_sources": model.att_sources}, "echo:3",
                               trainable="stages:layers")
    flops = []
    for st in stages:
        model = enter_stage(model, st, "keep")
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        flops.append(training_flops_per_token(model.config, 32, frozen))
    assert [st["trainable"] for st in stages] == ["layers"] * 3 + ["all"] and flops[0] < flops[1] < flops[2] < flops[3]
    for r in logs:  # the stage of a log line is the stage its iterations trained in
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops[r["stage"]] / 1e9), r
    assert {r["stage"] for r in logs} == {0, 1, 2, 3}


def test_eval_only_and_eval_datasets(data_dir, pretrained, tmp_path):
    """eval_only evaluates the model init_from names (here converted one-shot) and stops; an extra val set is
    evaluated and logged by name, and the run's own dataset named again gives exactly its val loss."""
    run(data_dir, tmp_path / "e", init_from=f"ckpt:{pretrained}", kv_share="echo:2", eval_only=True, eval_datasets="tiny",
        max_iters=30)
    log = read_log(tmp_path / "e")
    assert len(log) == 1 and log[0]["iter"] == 0 and log[0]["kv_share"] == "echo:2"
    assert log[0]["eval_losses"] == {"tiny": log[0]["val_loss"]}
    assert not os.path.exists(tmp_path / "e" / "ckpt.pt")  # nothing trained, nothing saved
    run(data_dir, tmp_path / "t", init_from=f"ckpt:{pretrained}", eval_datasets="tiny", max_iters=20)
    evals = [r for r in read_log(tmp_path / "t") if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20] and all(r["eval_losses"]["tiny"] == r["val_loss"] for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_eval_datasets_with_other_tokens_or_none_are_one_line(data_dir, tmp_path):
    from echo.tokenizer import gpt2_meta
    other = os.path.join(data_dir, "other")
    os.makedirs(other, exist_ok=True)
    meta = dict(gpt2_meta(), dtype="uint16")  # another tokenizer, written by hand (tiktoken not needed)
    with open(os.path.join(other, "meta.json"), "w") as f:
        import json
        json.dump(meta, f)
    import numpy as np
    np.arange(100, dtype=np.uint16).tofile(os.path.join(other, "val.bin"))  # an evaluation-only dataset: val.bin alone
    for extra, match in [("other", "'other' is tokenized with other tokens than dataset 'tiny'"),
                         ("absent", "dataset 'absent' is not prepared"), ("val", "'val' names a split")]:
        r = run_script("train.py", *tiny_args(data_dir, tmp_path / extra, eval_datasets=extra))
        assert r.returncode == 1 and "Traceback" not in r.stderr and match in r.stderr, r.stderr


# what each `trainable` setting trains in a 5-layer model where layer 2 reads layer 1's K/V and layer 4 reuses
# layer 3's attention (its rotated q and k) with its own V: written out by hand, not derived
READ = {"layers.1.attention.wk.weight", "layers.1.attention.wv.weight", "layers.3.attention.wq.weight",
        "layers.3.attention.wk.weight"}
CONSUMER_ATTENTION = {"layers.2.attention.wq.weight", "layers.2.attention.wo.weight", "layers.4.attention.wv.weight",
                      "layers.4.attention.wo.weight"}
CONSUMER_NORMS = {f"layers.{i}.{n}.weight" for i in (2, 4) for n in ("attention_norm", "ffn_norm")}
CONSUMER_MLPS = {f"layers.{i}.feed_forward.{w}.weight" for i in (2, 4) for w in ("w1", "w2", "w3")}
EXPECTED_TRAINED = {"attention": READ | CONSUMER_ATTENTION, "attention+norms": READ | CONSUMER_ATTENTION | CONSUMER_NORMS,
                    "layers": READ | CONSUMER_ATTENTION | CONSUMER_NORMS | CONSUMER_MLPS}


@pytest.mark.parametrize("trainable", ["all", "layers", "attention", "attention+norms"])
def test_trainable_sets_what_gets_a_gradient_and_the_flops(trainable):
    """Frozen weights get no gradient and no FLOPs: the count equals torch's counter (math attention kernel),
    and no backward runs below the lowest trained weight (layer 1 here, so not through layer 0 or the embedding)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from echo.conversion import TRAINABLE, adaptation_stages, enter_stage
    from model import LLaMA, ModelConfig
    assert trainable in TRAINABLE
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=13, block_size=7, n_layer=5, n_head=3, n_kv_head=1, n_embd=12, intermediate_size=20,
                      kv_share="0,1,1,3,4", att_share="0,1,2,3,3")
    model = LLaMA(cfg)
    stage = {"kv_sources": model.kv_sources, "att_sources": model.att_sources, "trainable": trainable}
    model = enter_stage(model, stage, "keep")
    names = {name for name, _ in model.named_parameters()}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == (names if trainable == "all" else EXPECTED_TRAINED[trainable])
    idx = torch.randint(0, cfg.vocab_size, (2, 7))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, targets=idx)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trained), name
    assert counter.get_total_flops() == training_flops_per_token(cfg, 7, names - trained) * 2 * 7
    # stages:X trains X in a layer-wise conversion's stages and everything in the final fine-tuning
    if trainable != "all":
        stages = adaptation_stages({"kv_sources": list(range(5)), "att_sources": list(range(5))}, "0,1,1,3,4",
                                   "0,1,2,3,3", f"stages:{trainable}")
        for st, expected in ((stages[0], EXPECTED_TRAINED[trainable]), (stages[-1], names)):
            st = dict(st, kv_sources=model.kv_sources, att_sources=model.att_sources)  # all converted: compare sets
            assert {n for n, p in enter_stage(model, st, "keep").named_parameters() if p.requires_grad} == expected


# ----------------------------------------------------------------------------------------------------
# The machine's own speed: the dtype it is best at, and memory that stays in the process

@pytest.mark.parametrize("cuda,capabilities,dtype", [
    (False, {"amx_bf16": True, "avx512_bf16": True}, "bfloat16"), (False, {"avx512_bf16": True}, "bfloat16"),
    (False, {"amx_bf16": False, "avx512_bf16": False, "avx2": True}, "float32"), (False, {}, "float32")])
def test_the_default_dtype_is_the_one_the_matrix_units_have(cuda, capabilities, dtype):
    from configurator import default_dtype
    chosen, why = default_dtype(cuda, capabilities)
    assert chosen == dtype and ("in hardware" in why) and (dtype == "float32") == ("emulated" in why)


def test_a_run_says_its_dtype_and_why(data_dir, tmp_path, capsys):
    from configurator import DTYPE, DTYPE_WHY
    argv = [a for a in tiny_args(data_dir, tmp_path / "default", max_iters=2) if not a.startswith("--dtype=")]
    train(configure(TrainConfig(), argv))
    assert f"dtype {DTYPE}: {DTYPE_WHY}\n" in capsys.readouterr().out
    run(data_dir, tmp_path / "set", max_iters=2)  # tiny_args sets float32
    assert "dtype float32: as set\n" in capsys.readouterr().out


KEEP = """
import sys, torch
from configurator import keep_freed_memory
kept = keep_freed_memory("cpu") if sys.argv[1] == "keep" else False
t = torch.ones(64 * 2**20)  # 256 MB, as a step's large tensors (glibc maps each block over 32 MB on its own)
address = t.data_ptr()
for line in open("/proc/self/maps"):
    low, high = (int(a, 16) for a in line.split()[0].split("-"))
    if low <= address < high:
        print(kept, line.split()[5] if len(line.split()) > 5 else "anonymous")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_memory_stays_in_the_process_on_a_cpu():
    """By default glibc maps a large block on its own and unmaps it when freed, so the next step page-faults it in
    again; after keep_freed_memory it comes from the heap, which keeps what is freed (its own process: the setting
    is the process's allocator's)."""
    out = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", KEEP, mode], capture_output=True, text=True, cwd=ROOT, check=True)
        out[mode] = r.stdout.split()
    assert out == {"default": ["False", "anonymous"], "keep": ["True", "[heap]"]}
