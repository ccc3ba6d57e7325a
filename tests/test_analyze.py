"""analyze.py runs: the log fields a plot needs, the table, the PNG, and a missing run in one line."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, read_log, run, run_script


@pytest.fixture(scope="module")
def two_runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run(data_dir, root / "base", n_layer=3, max_iters=12, eval_interval=4, log_interval=2)
    run(data_dir, root / "conv", init_from=f"ckpt:{root / 'base'}", kv_share_target="echo:2", adapt_iters=4,
        max_iters=12, eval_interval=4, log_interval=2)
    return root


def test_every_log_line_says_where_the_run_is(two_runs):
    lines = read_log(two_runs / "conv")
    tokens_per_iter = 4 * 32
    assert all(r["tokens"] == r["iter"] * tokens_per_iter for r in lines)
    train = [r for r in lines if "loss" in r]
    assert all(b["train_seconds"] >= a["train_seconds"] > 0 for a, b in zip(train, train[1:]))
    assert [r["stage"] for r in train] == [0, 0, 1, 1, 2, 2]
    # echo:2 on 3 layers converts layer 2, then layers 1 and 2, then fine-tunes: each line names its model
    assert [r["kv_share"] for r in train] == ["0,1,0", "0,1,0", "0,0,0", "0,0,0", "0,0,0", "0,0,0"]


def test_runs_table_and_plot(two_runs, tmp_path):
    png = tmp_path / "curves.png"
    r = run_script("-m", "tools.analyze", "runs", str(two_runs / "base"), str(two_runs / "conv"), f"--plot={png}")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert rows[0].split()[:3] == ["run", "sharing", "final"] and rows[1].startswith("base") and rows[2].startswith("conv")
    final = read_log(two_runs / "conv")[-1]
    assert f"{final['val_loss']:.4f}" in rows[2] and f"{final['tokens']:,}" in rows[2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < png.stat().st_size < 150_000


@pytest.mark.parametrize("argv,match", [
    (["runs", "/no/such/run"], "/no/such/run: no such run folder"),
    (["runs", "."], ". has no log.jsonl"),
    (["nonsense"], "unknown mode 'nonsense'"),
    (["runs"], "analyze.py runs needs at least one train.py out_dir"),
    (["layers", "--out_dir=x", "--n_producer=2"], "unknown config key 'n_producer' in --n_producer=2 (did you mean 'n_sources'?)"),
    (["layers", "--out_dir=x", "--n_sources=two"], "n_sources='two' in --n_sources=two: expected int, got str"),
    (["layers", "--out_dir=x"], "analyze.py layers needs --n_consumers=N[,N...]"),
    (["layers", "--out_dir=x", "--n_consumers=2", "--n_sources=3"], "one of the two"),
    (["frontier"], "analyze.py frontier needs train.py out_dirs"),
    (["runs", ".", "--plots=a.png"], "unknown config key 'plots'"),
])
def test_bad_input_is_one_line(argv, match):
    r = run_script("-m", "tools.analyze", *argv)
    assert r.returncode == 1 and "Traceback" not in r.stderr and match in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_piped_training_prints_plain_lines(data_dir, tmp_path):
    from conftest import tiny_args
    r = run_script("train.py", *tiny_args(data_dir, tmp_path, max_iters=10, eval_interval=5, log_interval=5))
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout + r.stderr
    assert "step 5: train loss" in r.stdout and "iter 10: loss" in r.stdout


def test_on_a_terminal_training_shows_a_bar(data_dir, tmp_path):
    import pty
    from conftest import tiny_args
    import fcntl
    import struct
    import termios
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    p = subprocess.Popen([sys.executable, "train.py", *tiny_args(data_dir, tmp_path, max_iters=10, eval_interval=5,
                                                                 log_interval=5)],
                         stdout=subprocess.PIPE, stderr=secondary, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(secondary)
    err = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    out, _ = p.communicate(timeout=1200)
    os.close(main)
    assert p.returncode == 0
    assert b"\r" in err and b"10/10" in err and b"tok/s" in err     # the bar, its count and its postfix
    assert b"step 5: train loss" in out and b"iter 10: loss" not in out  # evals above the bar, no iter lines


# ------------------------------------------------------------------------------------------------------
# analyze.py layers

def brute_force(cost, n_sources):
    """The least summed cost over every valid kv_sources list with exactly n_sources producers."""
    import itertools
    L, best = len(cost), float("inf")
    for sources in itertools.product(*[range(i + 1) for i in range(L)]):
        if sum(s == i for i, s in enumerate(sources)) != n_sources or any(sources[s] != s for s in sources):
            continue
        best = min(best, sum(cost[s, i] for i, s in enumerate(sources) if s != i))
    return best


@pytest.mark.parametrize("L", [1, 2, 5, 7])
def test_exact_optimiser_equals_brute_force(L):
    import numpy as np
    from echo.layer_costs import choose_sources, summed_cost
    rng = np.random.default_rng(L)
    for trial in range(6):
        cost = np.triu(rng.exponential(size=(L, L)) * rng.integers(0, 3, size=(L, L)), 1)  # ties and zeros too
        for P in range(1, L + 1):
            sources, exact = choose_sources(cost, P)
            assert exact and sum(s == i for i, s in enumerate(sources)) == P and sources[0] == 0
            assert all(sources[s] == s and s <= i for i, s in enumerate(sources))
            assert summed_cost(cost, sources) == pytest.approx(brute_force(cost, P), abs=1e-12)


def test_greedy_beyond_the_exact_limit_is_valid():
    import numpy as np
    from echo.layer_costs import choose_sources
    cost = np.triu(np.random.default_rng(0).random((9, 9)), 1)
    sources, exact = choose_sources(cost, 4, exact_up_to=8)
    assert not exact and sum(s == i for i, s in enumerate(sources)) == 4


@pytest.fixture(scope="module")
def five_layers(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("five")
    run(data_dir, out, n_layer=5, max_iters=30)
    return out


def test_a_layer_with_silent_attention_costs_nothing_to_convert(data_dir, five_layers):
    import torch
    from echo.layer_costs import share_costs
    from data.loader import get_batch
    from echo.checkpoint import load_checkpoint, model_from_checkpoint
    from configurator import configure
    from data.loader import load_dataset
    from train import TrainConfig
    model = model_from_checkpoint(load_checkpoint(five_layers / "ckpt.pt")).eval()
    with torch.no_grad():
        model.layers[3].attention.wo.weight.zero_()  # layer 3's attention output is 0 whatever K/V it reads
    data, _ = load_dataset(configure(TrainConfig(), [f"--data_dir={data_dir}", "--dataset=tiny", "--block_size=32"]))
    g = torch.Generator().manual_seed(0)
    cost, base = share_costs(model, [get_batch(data["val"], 4, 32, g) for _ in range(3)])
    assert all(abs(cost[i, 3]) < 1e-6 for i in range(3))
    assert all(abs(cost[i, j]) > 1e-4 for i in range(5) for j in range(i + 1, 5) if j != 3)  # the others do cost


@pytest.mark.parametrize("kind", ["kv", "att"])
def test_a_pair_cost_is_the_loss_of_the_converted_model(data_dir, five_layers, kind):
    """A pair tried through layer_step's `reads` must do what a real conversion does (layer j then uses layer i's
    K/V or attention as is), and leave the model as it was: its sources, rule and weights unchanged."""
    import torch
    from echo.layer_costs import mean_loss, share_costs
    from data.loader import get_batch
    from echo.checkpoint import load_checkpoint, model_from_checkpoint
    from echo.conversion import convert_sharing
    from configurator import configure
    from data.loader import load_dataset
    from train import TrainConfig
    model = model_from_checkpoint(load_checkpoint(five_layers / "ckpt.pt")).eval()
    data, _ = load_dataset(configure(TrainConfig(), [f"--data_dir={data_dir}", "--dataset=tiny", "--block_size=32"]))
    g = torch.Generator().manual_seed(0)
    batches = [get_batch(data["val"], 4, 32, g) for _ in range(2)]
    before = (list(model.kv_sources), list(model.att_sources), [dict(r) for r in model.reads_from],
              {k: v.clone() for k, v in model.state_dict().items()})
    cost, base = share_costs(model, batches, kind)
    assert (model.kv_sources, model.att_sources, model.reads_from) == before[:3]
    assert all(torch.equal(v, before[3][k]) for k, v in model.state_dict().items())
    for i, j in [(0, 1), (1, 4), (2, 3)]:
        sources = list(range(5))
        sources[j] = i
        spec = ",".join(map(str, sources))
        converted = convert_sharing(model, **{f"{kind}_share": spec}).eval()
        assert abs(cost[i, j] - (mean_loss(converted, batches) - base)) < 1e-5


def test_layers_prints_a_valid_spec_and_writes_the_heat_maps(five_layers, data_dir, tmp_path):
    from echo.checkpoint import load_checkpoint
    from model import resolve_sources
    png = tmp_path / "layers.png"
    r = run_script("-m", "tools.analyze", "layers", f"--out_dir={five_layers}", f"--data_dir={data_dir}", "--n_sources=3",
                   "--batches=3", "--batch_size=4", f"--plot={png}")
    assert r.returncode == 0, r.stderr
    kv_line, att_line = r.stdout.strip().splitlines()[-2:]
    assert kv_line.startswith("kv_share=") and att_line.startswith("att_share=")
    for line in (kv_line, att_line):
        sources = resolve_sources(line.partition("=")[2], 5)
        assert sum(s == i for i, s in enumerate(sources)) == 3
    assert "K/V, echo:2 " in r.stdout and "K/V, cla:2 " in r.stdout  # the fixed patterns at 3 producers, beside it
    assert "attention, by similarity" in r.stdout and "attention, echo:2 " in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # train.py takes the printed specs as they are
    run(data_dir, tmp_path / "ft", init_from=f"ckpt:{five_layers}", kv_share=kv_line.partition("=")[2], max_iters=2)
    run(data_dir, tmp_path / "att", init_from=f"ckpt:{five_layers}", att_share=att_line.partition("=")[2], max_iters=2)
    assert load_checkpoint(tmp_path / "att" / "ckpt.pt")["model_args"]["att_share"] == att_line.partition("=")[2]


@pytest.mark.parametrize("extra,match", [
    (["--n_sources=0"], "--n_sources=0: expected 1 to n_layer=5"),
    (["--n_sources=6"], "--n_sources=6: expected 1 to n_layer=5"),
    (["--n_sources=2", "--dataset=absent"], "dataset 'absent' is not prepared"),
])
def test_layers_bad_input_is_one_line(five_layers, data_dir, extra, match):
    r = run_script("-m", "tools.analyze", "layers", f"--out_dir={five_layers}", f"--data_dir={data_dir}", *extra)
    assert r.returncode == 1 and "Traceback" not in r.stderr and match in r.stderr, r.stderr
    r = run_script("-m", "tools.analyze", "layers", "--out_dir=/no/ckpt", "--n_sources=2")
    assert r.returncode == 1 and "no checkpoint at /no/ckpt/ckpt.pt" in r.stderr


def test_frontier_reads_gaps_savings_and_accuracy_from_the_runs(two_runs, data_dir, tmp_path):
    """The original (eval_only) beside converted runs, each judging the same eval_datasets entry: one-shot is the
    first eval, after the last; the cache saved and parameters follow each run's sharing."""
    import json
    base = dict(init_from=f"ckpt:{two_runs / 'base'}", eval_datasets="tiny", max_iters=4, eval_interval=2)
    run(data_dir, tmp_path / "orig", eval_only=True, **base)
    run(data_dir, tmp_path / "kv1", kv_share="echo:1", **base)
    run(data_dir, tmp_path / "att2", att_share="echo:2", **base)
    run(data_dir, tmp_path / "kv2staged", **dict(base, kv_share_target="echo:2", adapt_iters=1))
    (tmp_path / "kv1" / "local_mc.json").write_text(json.dumps({"results": {"local_mc": {"acc,none": 0.625}}}))
    png = tmp_path / "frontier.png"
    r = run_script("-m", "tools.analyze", "frontier", str(tmp_path / "orig"), str(tmp_path / "kv1"),
                   str(tmp_path / "att2"), str(tmp_path / "kv2staged"), "--within=100", f"--plot={png}")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.startswith(("kv1", "att2", "kv2"))}
    # a layer-wise run's first eval is its stage 0 (one layer converted): no one-shot figure, not a wrong one
    assert rows["kv2staged"][1:5] == ["K/V", "2", "4", "-"]
    orig = read_log(tmp_path / "orig")[0]
    for name, kind, n in (("kv1", "K/V", 1), ("att2", "attention", 2)):
        evals = [x for x in read_log(tmp_path / name) if "val_loss" in x]
        gaps = [evals[i]["eval_losses"]["tiny"] - orig["eval_losses"]["tiny"] for i in (0, -1)]
        assert rows[name][1:4] == [kind, str(n), "4"] and rows[name][4:6] == [f"{g:+.3f}" for g in gaps]
        saved = 1 - evals[-1]["kv_bytes_per_token"] / orig["kv_bytes_per_token"]
        assert rows[name][6] == f"{saved:.1%}" and int(rows[name][7].replace(",", "")) == orig["params"] - evals[-1]["params"]
    assert rows["kv1"][-1] == "0.625" and rows["att2"][-1] == "-"  # local_mc after training, where eval.py wrote it
    assert "K/V: the most consumers within 100.0 nats after training: 2" in r.stdout  # kv2staged counts after training
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_original = run_script("-m", "tools.analyze", "frontier", str(tmp_path / "kv1"))
    assert no_original.returncode == 1 and "needs the original" in no_original.stderr


def test_recovery_trend_recovers_a_log_linear_curve_and_its_tokens():
    from tools.analyze import recovery_trend, tokens_for
    points = [(0, 0.9)] + [(t, 0.5 - 0.05 * math.log10(t)) for t in (5e3, 1e4, 2e4, 4e4, 8e4, 1.6e5)]
    a, b = recovery_trend(points, fit_from=10000)  # the one-shot point and 5k are not fitted
    assert abs(a - 0.5) < 1e-9 and abs(b + 0.05) < 1e-9
    assert abs(tokens_for((a, b), 0.2) - 1e6) < 1e-3 and tokens_for((0.3, 0.01), 0.1) is None
    assert recovery_trend(points, fit_from=1e5) is None  # one point is no trend


def test_curve_tabulates_fits_and_plots_a_doubling_run(two_runs, data_dir, tmp_path):
    """A run evaluated at doubling iterations beside the original: the gap at each eval, the trend over the points
    from fit_from on, the tokens it predicts, the PNG; a run without its original is one line."""
    from tools.analyze import recovery_trend
    base = dict(init_from=f"ckpt:{two_runs / 'base'}", eval_datasets="tiny", eval_interval=1)
    run(data_dir, tmp_path / "orig", eval_only=True, **base)
    run(data_dir, tmp_path / "kv1", kv_share="echo:1", max_iters=6, eval_spacing="doubling", **base)
    evals = [x for x in read_log(tmp_path / "kv1") if "val_loss" in x]
    assert [e["iter"] for e in evals] == [0, 1, 2, 4, 6]  # 0, then eval_interval x 1, 2, 4, and the last
    png, saved = tmp_path / "curve.png", tmp_path / "kv1.json"
    r = run_script("-m", "tools.analyze", "curve", str(tmp_path / "kv1"), str(tmp_path / "orig"), "--fit_from=1",
                   "--targets=-5", f"--save={saved}")
    assert r.returncode == 0, r.stderr
    again = run_script("-m", "tools.analyze", "curve", str(tmp_path / "kv1"), str(tmp_path / "orig"), "--fit_from=1",
                       "--targets=-5", f"--plot={png}", f"--beside={saved}")  # drawn beside its own saved points
    assert again.returncode == 0 and again.stdout == r.stdout + f"wrote {png}\n", again.stderr
    orig = read_log(tmp_path / "orig")[0]["eval_losses"]["tiny"]
    gaps = [(e["tokens"], e["eval_losses"]["tiny"] - orig) for e in evals]
    for tokens, gap in gaps:
        assert f"{tokens:>10,}" in r.stdout and f"{gap:+8.3f}" in r.stdout
    a, b = recovery_trend(gaps, 1)
    assert f"gap = {a:.3f} {b:+.4f} x log10(tokens)" in r.stdout and "gap -5.00: " in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads(saved.read_text())["points"]
    assert [(t, round(g, 6)) for t, g, _ in points] == [(t, round(g, 6)) for t, g in gaps]
    alone = run_script("-m", "tools.analyze", "curve", str(tmp_path / "kv1"))
    assert alone.returncode == 1 and "curve needs two train.py out_dirs" in alone.stderr
    bad = run_script("-m", "tools.analyze", "curve", str(tmp_path / "kv1"), str(tmp_path / "orig"),
                     f"--plot={png}", f"--beside={tmp_path / 'orig' / 'log.jsonl'}")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not a curve --save wrote" in bad.stderr
    unplotted = run_script("-m", "tools.analyze", "curve", str(tmp_path / "kv1"), str(tmp_path / "orig"),
                           f"--beside={saved}")  # nothing to draw it on: said, not ignored
    assert unplotted.returncode == 1 and "give --plot" in unplotted.stderr and not unplotted.stdout
