"""Look at runs and models.

    python analyze.py runs out-shakespeare-char-cpu out-shakespeare-char-cpu-echo --plot=curves.png

runs: for each train.py out_dir, a table line (final and best val loss, tokens, training seconds, tokens/s),
and with --plot the loss curves against tokens seen and against training seconds (evals excluded), one colour
per run labelled with its kv_share, the layer-wise conversion stages marked. matplotlib is needed only for
--plot.
"""
import argparse
import json
import os
import sys

from model import UsageError


def read_run(folder):
    """A run's log.jsonl as {'name', 'train': log lines, 'evals': eval lines}, checked."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such run folder")
    if not os.path.isfile(path):
        raise UsageError(f"{folder} has no log.jsonl: not a train.py out_dir")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{path}: line {n} is not JSON") from None
    evals = [r for r in records if "val_loss" in r]
    if not evals:
        raise UsageError(f"{path} has no eval line yet")
    if "tokens" not in evals[-1]:
        raise UsageError(f"{path} was written by an older train.py (no tokens or train_seconds): re-run it")
    return {"name": os.path.basename(os.path.normpath(folder)), "train": [r for r in records if "loss" in r],
            "evals": evals}


def summary(run):
    last = run["evals"][-1]
    return {"run": run["name"], "kv_share": last["kv_share"], "final val": last["val_loss"],
            "best val": min(r["val_loss"] for r in run["evals"]), "tokens": last["tokens"],
            "train s": last["train_seconds"],
            "tok/s": last["tokens"] / last["train_seconds"] if last["train_seconds"] else float("nan")}


def stage_starts(records, x):
    """x positions where a layer-wise conversion entered a new stage."""
    return [b[x] for a, b in zip(records, records[1:]) if b["stage"] != a["stage"]]


def plot_runs(runs, file):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, run in enumerate(runs):
        color, label = f"C{i}", f"{run['name']} ({run['evals'][-1]['kv_share']})"
        train = sorted(run["train"], key=lambda r: r["iter"])
        for ax, x in zip(axes, ("tokens", "train_seconds")):
            # with distillation the training loss mixes in the KL: plot its cross-entropy part
            ax.plot([r[x] for r in train], [r.get("ce", r["loss"]) for r in train], color=color, alpha=0.3, lw=1)
            ax.plot([r[x] for r in run["evals"]], [r["val_loss"] for r in run["evals"]], color=color, marker="o",
                    ms=3, lw=1.5, label=label)
            for start in stage_starts(train, x):
                ax.axvline(start, color=color, ls=":", lw=1)
    axes[0].set(xlabel="tokens seen", ylabel="loss (line: val; faint: train)")
    axes[1].set(xlabel="training seconds (evals excluded)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("dotted: a layer-wise conversion stage begins", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(file, dpi=90)
    except OSError as e:
        raise UsageError(f"cannot write {file} ({e.strerror})") from None
    plt.close(fig)


def runs_main(args):
    runs = [read_run(folder) for folder in args.dirs]
    rows = [summary(r) for r in runs]
    print(f"{'run':32} {'kv_share':>12} {'final val':>10} {'best val':>10} {'tokens':>12} {'train s':>9} {'tok/s':>9}")
    for r in rows:
        print(f"{r['run'][:32]:32} {r['kv_share'][:12]:>12} {r['final val']:10.4f} {r['best val']:10.4f} "
              f"{r['tokens']:12,} {r['train s']:9.1f} {r['tok/s']:9,.0f}")
    if args.plot:
        plot_runs(runs, args.plot)
        print(f"wrote {args.plot}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 1, like every other script here
        raise UsageError(message)


def main(argv):
    parser = Parser(description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True, parser_class=Parser)
    runs = modes.add_parser("runs", help="loss curves and a table for train.py runs")
    runs.add_argument("dirs", nargs="+", help="train.py out_dir folders")
    runs.add_argument("--plot", default="", help="write the curves to this PNG")
    args = parser.parse_args(argv)
    runs_main(args)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UsageError as e:
        sys.exit(f"error: {e}")
