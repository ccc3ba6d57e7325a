"""analyze.py runs: the log fields a plot needs, the table, the PNG, and a missing run in one line."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, read_log, run


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
    r = subprocess.run([sys.executable, "analyze.py", "runs", str(two_runs / "base"), str(two_runs / "conv"),
                        f"--plot={png}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert rows[0].split()[:3] == ["run", "kv_share", "final"] and rows[1].startswith("base") and rows[2].startswith("conv")
    final = read_log(two_runs / "conv")[-1]
    assert f"{final['val_loss']:.4f}" in rows[2] and f"{final['tokens']:,}" in rows[2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < png.stat().st_size < 150_000


@pytest.mark.parametrize("argv,match", [
    (["runs", "/no/such/run"], "/no/such/run: no such run folder"),
    (["runs", "."], ". has no log.jsonl"),
    (["nonsense"], "invalid choice: 'nonsense'"),
    (["runs"], "the following arguments are required: dirs"),
])
def test_bad_input_is_one_line(argv, match):
    r = subprocess.run([sys.executable, "analyze.py", *argv], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr and match in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_piped_training_prints_plain_lines(data_dir, tmp_path):
    from conftest import tiny_args
    r = subprocess.run([sys.executable, "train.py", *tiny_args(data_dir, tmp_path, max_iters=10, eval_interval=5,
                                                               log_interval=5)],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
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
    out, _ = p.communicate(timeout=120)
    os.close(main)
    assert p.returncode == 0
    assert b"\r" in err and b"10/10" in err and b"tok/s" in err     # the bar, its count and its postfix
    assert b"step 5: train loss" in out and b"iter 10: loss" not in out  # evals above the bar, no iter lines
