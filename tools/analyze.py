"""Look at runs and models.

    python -m tools.analyze runs out-shakespeare-char-cpu out-shakespeare-char-cpu-echo --plot=curves.png
    python -m tools.analyze layers --out_dir=out-shakespeare-char-cpu --n_sources=2 --plot=layers.png
    python -m tools.analyze layers --init_from=gguf:PATH --dataset=teacher_smollm2 --n_consumers=2,4,7 --batches=4
    python -m tools.analyze curve out-curve-kv7 out-original --dataset=wikitext2_smollm2 --plot=curve.png
    python -m tools.analyze frontier out-original out-kv-7 out-att-7 ... --dataset=wikitext2_smollm2 --plot=frontier.png

runs: for each train.py out_dir, a table line (final and best val loss, tokens, training seconds, tokens/s, the
eval_datasets' first and last loss), and with --plot (matplotlib) the loss curves against tokens seen and
training seconds (evals excluded), a colour per run, eval_datasets dashed, conversion stages marked.

layers: for a model that shares nothing, the one-shot cost of every pair (layer j reading layer i's K/V, or
reusing its attention) on batches from the first half of the val split; K/V and attention-map similarities;
the cheapest kv_share and att_share with --n_consumers layers reading another's (or --n_sources keeping
their own); each whole spec one-shot beside echo, CLA and EchoAtt's most-similar choice, on held-out batches
from the second half. The last lines are the chosen specs, ready for train.py.

curve: for one converted run beside the original, the gap on a held-out set at every eval against the tokens
trained (train.py eval_spacing=doubling spaces them on a log axis), a trend fitted on log tokens from --fit_from on,
and the tokens it predicts for each --targets gap; --save keeps the points, so a later --plot draws them --beside.

frontier: for converted runs beside the original (all with --eval_datasets), the gap to the original on a
held-out set one-shot and after training, what each saves (cache, parameters), local_mc accuracy where eval.py
wrote it (RUN/local_mc.json, RUN/local_mc_oneshot.json), the most consumers within --within nats per kind.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from configurator import check_device, configure, read_json, run_main
from data.loader import get_batch, load_dataset
from echo.checkpoint import load_checkpoint
from echo.conversion import convert_sharing
from echo.layer_costs import choose_sources, cla_like, layer_similarities, mean_loss, share_costs, summed_cost
from echo.pretrained import IMPORTS, load_pretrained
from echo.report import plot_curve, plot_frontier, plot_layers, plot_runs
from echo.runlog import read_run, sharing
from model import UsageError


def runs_main(dirs, args):
    runs = [read_run(folder) for folder in dirs]
    print(f"{'run':32} {'sharing':>12} {'final val':>10} {'best val':>10} {'tokens':>12} {'train s':>9} {'tok/s':>9}")
    for run in runs:
        last, extra = run["evals"][-1], run["evals"][-1].get("eval_losses", {})  # extra: eval_datasets
        tok_s = last["tokens"] / last["train_seconds"] if last["train_seconds"] else float("nan")
        print(f"{run['name'][:32]:32} {sharing(last)[:12]:>12} {last['val_loss']:10.4f} "
              f"{min(r['val_loss'] for r in run['evals']):10.4f} {last['tokens']:12,} {last['train_seconds']:9.1f} {tok_s:9,.0f}"
              + "".join(f"  {k} {run['evals'][0].get('eval_losses', {}).get(k, math.nan):.4f} -> {v:.4f}" for k, v in extra.items()))
    if args.plot:
        plot_runs(runs, args.plot)
        print(f"wrote {args.plot}")


# ----------------------------------------------------------------------------------------------------
# layers: which layers can give up their own K/V most cheaply (the measuring and choosing: echo/layer_costs.py)

def matrix_table(name, m, fmt):
    L = len(m)
    lines = [f"{name} (row i = the layer read, column j = the reader)", "      " + "".join(f"{j:>8}" for j in range(L))]
    for i in range(L):
        lines.append(f"{i:>6}" + "".join(f"{m[i, j]:>8{fmt}}" if i < j else f"{'':>8}" for j in range(L)))
    return "\n".join(lines)


def layers_main(args):
    check_device(args.device)
    if bool(args.out_dir) == bool(args.init_from):
        raise UsageError("give one of --out_dir=DIR (a train.py checkpoint) or --init_from=hf:DIR or gguf:FILE")
    if args.init_from and not args.init_from.startswith(IMPORTS):
        raise UsageError(f"--init_from={args.init_from}: expected hf:DIR or gguf:FILE (for a train.py checkpoint "
                         f"use --out_dir)")
    if min(args.batches, args.heldout_batches, args.batch_size) < 1:
        raise UsageError("--batches, --heldout_batches and --batch_size must be at least 1")
    config = {}  # a train.py run's own settings: its dataset, data_dir and context unless given
    if args.out_dir:
        ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), require=("meta",))
        config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    dataset = args.dataset or config.get("dataset")
    if not dataset:
        raise UsageError(f"{'the checkpoint does not name its dataset' if args.out_dir else '--init_from needs --dataset=NAME'}"
                         f": give --dataset=NAME, a dataset prepared with the model's tokenizer")
    cfg = SimpleNamespace(data_dir=args.data_dir or config.get("data_dir", "data"), dataset=dataset,
                          block_size=args.block_size or config.get("block_size", 512))
    if cfg.block_size < 1:
        raise UsageError("--block_size must be at least 1")
    data, meta = load_dataset(cfg)
    model = load_pretrained(f"ckpt:{args.out_dir}" if args.out_dir else args.init_from, meta, cfg.dataset)
    if model.kv_sources != list(range(len(model.layers))) or model.att_sources != list(range(len(model.layers))):
        raise UsageError(f"the model already shares (kv_share={model.config.kv_share}, att_share="
                         f"{model.config.att_share}): analyze the model it was converted from")
    L = model.config.n_layer
    counts = consumer_counts(args, L)
    cfg.block_size = min(cfg.block_size, model.config.block_size)
    model = model.to(args.device).eval()
    # the specs are chosen on batches from the first half of the val split and judged on batches from the
    # second half: a margin measured on the batches it was chosen on would partly be selection on noise
    half = len(data["val"]) // 2
    if half <= cfg.block_size:
        raise UsageError(f"the val split has {len(data['val'])} tokens: each half needs more than block_size = "
                         f"{cfg.block_size} (one half chooses the specs, the other judges them); lower --block_size")
    g = torch.Generator().manual_seed(args.seed)
    batches, heldout = ([tuple(t.to(args.device) for t in get_batch(part, args.batch_size, cfg.block_size, g))
                         for _ in range(count)]
                        for part, count in ((data["val"][:half], args.batches), (data["val"][half:], args.heldout_batches)))

    t0 = time.time()
    cost, base = share_costs(model, batches, "kv")
    att_cost, _ = share_costs(model, batches, "att")
    kv_sim, att_sim = layer_similarities(model, batches[:args.similarity_batches])
    name = args.out_dir or args.init_from
    print(f"{name}: {L} layers, val loss {base:.4f} over {args.batches} batches of {args.batch_size} x {cfg.block_size} "
          f"(first half of val); {2 * len(cost) * (len(cost) - 1) // 2} pair costs in {time.time() - t0:.0f} s")
    print(matrix_table("cost: rise in val loss when layer j reads layer i's K/V", cost, ".3f"))
    print(matrix_table("cost: rise in val loss when layer j reuses layer i's attention (q and k)", att_cost, ".3f"))
    print(matrix_table("K/V similarity: mean cosine of K and V vectors per head and position", kv_sim, ".2f"))
    print(matrix_table("attention similarity: mean cosine of the causal attention maps per head", att_sim, ".2f"))
    heldout_base = mean_loss(model, heldout)
    report = {"source": name, "dataset": cfg.dataset, "n_layer": L, "base": base, "heldout_base": heldout_base,
              "kv_cost": cost.tolist(), "att_cost": att_cost.tolist(), "chosen": {}}
    for n_consumers in counts:
        report["chosen"][n_consumers] = choose_and_judge(model, n_consumers, cost, att_cost, att_sim, heldout, heldout_base)
    if args.plot:
        short = name if len(name) <= 40 else f"{name.partition(':')[0]}:{os.path.basename(name.rstrip('/'))}"
        plot_layers(cost, att_cost, kv_sim, att_sim, args.plot, f"{short}: which layers can share K/V or attention")
        print(f"wrote {args.plot}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(report, f)
        print(f"wrote {args.save}")
    for n_consumers, chosen in report["chosen"].items():  # the last lines go to train.py as they are
        prefix = f"{n_consumers} consumers: " if len(counts) > 1 else ""
        print(f"{prefix}kv_share={chosen['kv_share']}")
        print(f"{prefix}att_share={chosen['att_share']}")


def consumer_counts(args, n_layer):
    """The numbers of consumers to choose specs for: --n_consumers=N[,N...] (as echo:N counts), or
    --n_sources=P (the layers that stay their own source: n_layer - P consumers)."""
    if "n_sources" in args.explicit:
        if not 1 <= args.n_sources <= n_layer:
            raise UsageError(f"--n_sources={args.n_sources}: expected 1 to n_layer={n_layer}")
        return [n_layer - args.n_sources]
    try:
        counts = [int(c) for c in str(args.n_consumers).split(",")]
    except ValueError:
        raise UsageError(f"--n_consumers={args.n_consumers!r}: expected whole numbers, e.g. 7 or 2,4,7") from None
    if not all(0 <= c <= n_layer - 1 for c in counts):
        raise UsageError(f"--n_consumers={args.n_consumers}: each must be 0 to n_layer-1 = {n_layer - 1}")
    return counts


def choose_and_judge(model, n_consumers, cost, att_cost, att_sim, heldout, heldout_base):
    """The cheapest kv_share and att_share with n_consumers consumers, beside the fixed patterns with as many,
    each converted one-shot and judged on the held-out batches. Returns the chosen specs and every loss."""
    L = len(cost)
    n = L - n_consumers  # layers that stay their own source
    sources, exact = choose_sources(cost, n)
    att_sources, _ = choose_sources(att_cost, n)
    print(f"chosen ({'exact: every source set tried' if exact else 'greedy: too many source sets to try'}), "
          f"{n_consumers} of {L} layers consumers: kv_sources={sources}, summed pairwise cost "
          f"{summed_cost(cost, sources):.4f}; att_sources={att_sources}, summed pairwise cost "
          f"{summed_cost(att_cost, att_sources):.4f}")
    # pairwise costs do not add up: measure each whole spec, converted one-shot with the sources' own weights
    candidates = [("K/V, chosen by cost", ",".join(map(str, sources)), "none")]
    if n < L:
        candidates.append((f"K/V, echo:{L - n}", f"echo:{L - n}", "none"))
    spec, label = cla_like(L, n)
    candidates.append((f"K/V, {label}", spec, "none"))
    candidates.append(("attention, chosen by cost", "none", ",".join(map(str, att_sources))))
    by_similarity, _ = choose_sources(1 - att_sim, n)  # EchoAtt's criterion: the most similar attention maps
    candidates.append(("attention, by similarity", "none", ",".join(map(str, by_similarity))))
    if n < L:
        candidates.append((f"attention, echo:{L - n}", "none", f"echo:{L - n}"))
    print(f"one-shot val loss with {n_consumers} layers sharing, no training, on {len(heldout)} held-out batches (second "
          f"half of val, not used to choose; the unconverted model: {heldout_base:.4f}):")
    losses = {}
    for label, kv_share, att_share in candidates:
        converted = convert_sharing(model, kv_share, att_share).eval()
        which = converted.kv_sources if kv_share != "none" else converted.att_sources
        losses[label] = {"kv_share": kv_share, "att_share": att_share, "loss": mean_loss(converted, heldout)}
        print(f"  {label:32} {'kv' if kv_share != 'none' else 'att'}_sources={which}  val loss {losses[label]['loss']:.4f}")
    return {"kv_share": ",".join(map(str, sources)), "att_share": ",".join(map(str, att_sources)), "heldout": losses}


# ----------------------------------------------------------------------------------------------------
# frontier: what each conversion keeps against what it saves, from the runs' logs

def frontier_point(run, dataset, reference):
    """One run as a frontier point: its kind, consumers, the gap to the original on `dataset` one-shot and at the
    end (last eval), what it saves, and local_mc accuracy where eval.py wrote it beside the run. The one-shot gap
    is the first eval's only where that eval saw the final sharing: a layer-wise run's first eval is its stage 0
    (one layer converted), not the one-shot model, so it has none (None)."""
    first, last = run["evals"][0], run["evals"][-1]
    converted_at_start = all(first.get(key) == last.get(key) for key in ("kv_sources", "att_sources"))
    if dataset not in last.get("eval_losses", {}) or "kv_bytes_per_token" not in last:
        raise UsageError(f"{run['name']} has no {dataset} loss or no cost figures: run train.py with "
                         f"--eval_datasets={dataset}")
    kv = [i for i, s in enumerate(last["kv_sources"]) if s != i]
    att = [i for i, s in enumerate(last["att_sources"]) if s != i]
    files = {"one-shot": "local_mc_oneshot.json", "after": "local_mc.json"}
    accuracy = {when: read_json(os.path.join(run["folder"], file), "eval.py's results")["results"]["local_mc"]["acc,none"]
                for when, file in files.items() if os.path.isfile(os.path.join(run["folder"], file))}
    ref = reference["evals"][0]
    return {"run": run["name"], "kind": "K/V" if kv else "attention" if att else "none", "consumers": len(kv + att),
            "iters": last["iter"],
            "one-shot": first["eval_losses"][dataset] - ref["eval_losses"][dataset] if converted_at_start else None,
            "after": last["eval_losses"][dataset] - ref["eval_losses"][dataset],
            "cache saved": 1 - last["kv_bytes_per_token"] / ref["kv_bytes_per_token"],
            "params saved": ref["params"] - last["params"], "acc": accuracy}


def frontier_main(dirs, args):
    runs = [read_run(folder) for folder in dirs]
    plain = [r for r in runs if all(s == i for key in ("kv_sources", "att_sources")
                                    for i, s in enumerate(r["evals"][-1].get(key, [])))]
    if not plain:
        raise UsageError("frontier needs the original among the runs: one that shares nothing (train.py "
                         "--eval_only=True with the same eval_datasets)")
    dataset = args.dataset or next(iter(plain[0]["evals"][-1].get("eval_losses", {})), "")
    points = sorted((frontier_point(r, dataset, plain[0]) for r in runs if r not in plain),
                    key=lambda p: (p["kind"], p["consumers"], p["iters"]))
    print(f"gap to the original on {dataset} (nats; the original: {plain[0]['name']}), one-shot -> after training")
    print(f"{'run':28} {'kind':>9} {'consumers':>9} {'iters':>5} {'one-shot':>9} {'after':>8} {'cache saved':>11} "
          f"{'params saved':>12} {'local_mc one-shot -> after':>27}")
    for p in points:
        acc = " -> ".join(f"{p['acc'][w]:.3f}" if w in p["acc"] else "-" for w in ("one-shot", "after"))
        one_shot = "-" if p["one-shot"] is None else f"{p['one-shot']:+.3f}"
        print(f"{p['run'][:28]:28} {p['kind']:>9} {p['consumers']:>9} {p['iters']:>5} {one_shot:>9} "
              f"{p['after']:>+8.3f} {p['cache saved']:>11.1%} {p['params saved']:>12,} {acc:>27}")
    for kind in ("K/V", "attention"):
        within = [p["consumers"] for p in points if p["kind"] == kind and p["after"] <= args.within]
        print(f"{kind}: the most consumers within {args.within} nats after training: {max(within, default='none')}")
    if args.plot:
        plot_frontier(points, dataset, args.within, args.plot)
        print(f"wrote {args.plot}")


# ----------------------------------------------------------------------------------------------------
# curve: how a converted model recovers with the tokens it trains on

def recovery_trend(points, fit_from):
    """Least squares gap = a + b * log10(tokens) over the points (tokens, gap) with tokens >= fit_from: (a, b), or
    None with fewer than two such points."""
    fit = [(math.log10(t), g) for t, g in points if t >= max(fit_from, 1)]
    if len(fit) < 2:
        return None
    b, a = np.polyfit(*zip(*fit), 1)
    return float(a), float(b)


def tokens_for(trend, gap):
    """The tokens the trend reaches `gap` at (None if it does not fall)."""
    a, b = trend
    return 10 ** ((gap - a) / b) if b < 0 else None


def curve_main(dirs, args):
    if args.beside and not args.plot:
        raise UsageError("--beside draws earlier curves on the --plot PNG: give --plot=FILE.png too")
    beside = earlier_curves(args.beside)
    runs = [read_run(folder) for folder in dirs]
    plain = [r for r in runs if all(s == i for key in ("kv_sources", "att_sources")
                                    for i, s in enumerate(r["evals"][-1].get(key, [])))]
    if not plain or len(runs) - len(plain) != 1:
        raise UsageError("curve needs two train.py out_dirs: the converted run and the original (one that shares "
                         "nothing, e.g. train.py --eval_only=True with the same eval_datasets)")
    run, ref = next(r for r in runs if r not in plain), plain[0]["evals"][0]
    dataset = args.dataset or next(iter(ref.get("eval_losses", {})), "")
    if any(dataset not in e.get("eval_losses", {}) for e in run["evals"] + [ref]):
        raise UsageError(f"{run['name']} or the original has no {dataset!r} loss at every eval: run train.py with "
                         f"--eval_datasets={dataset or 'NAME'}")
    points = [(e["tokens"], e["eval_losses"][dataset] - ref["eval_losses"][dataset], e["train_seconds"])
              for e in run["evals"]]
    print(f"{run['name']}: gap to the original on {dataset} (original {ref['eval_losses'][dataset]:.4f})")
    print(f"{'tokens':>10} {'train s':>8} {'gap':>8}")
    for tokens, gap, seconds in points:
        print(f"{tokens:>10,} {seconds:>8.0f} {gap:>+8.3f}")
    trend = recovery_trend([(t, g) for t, g, _ in points], args.fit_from)
    targets = [float(t) for t in str(args.targets).split(",")]
    if trend:
        print(f"trend from {args.fit_from:,} tokens on: gap = {trend[0]:.3f} {trend[1]:+.4f} x log10(tokens) "
              f"({trend[1] * math.log10(2):+.4f} per doubling)")
        for gap in targets:
            needed = tokens_for(trend, gap)
            print(f"  gap {gap:.2f}: " + (f"{needed:,.3g} tokens by the trend" if needed else "not reached by the trend"))
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"name": run["name"], "dataset": dataset, "points": points}, f, indent=1)
    if args.plot:
        plot_curve(points, trend, targets, f"{run['name']}: {dataset} gap to the original", args.plot,
                   [tokens_for(trend, g) for g in targets] if trend else [], beside)
        print(f"wrote {args.plot}")


def earlier_curves(files):
    """The (name, points) of each curve an earlier `curve --save` wrote, from a comma-separated list of its files."""
    curves = []
    for file in filter(None, files.split(",")):
        try:
            with open(file) as f:
                saved = json.load(f)
            curves.append((saved["name"], [tuple(p) for p in saved["points"]]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--beside={file}: not a curve --save wrote ({e})") from None
    return curves


@dataclass
class CurveConfig:
    dataset: str = ""             # the eval_datasets entry judged (default: the original's first)
    fit_from: int = 20000         # tokens from which on the trend is fitted (the first evals fall faster)
    targets: str = "0.10,0.05"    # gaps (nats) the trend is asked the tokens for
    plot: str = ""                # write gap against tokens (log axis) with the trend to this PNG
    save: str = ""                # write the points (tokens, gap, training seconds) to this JSON file ...
    beside: str = ""              # ... which --beside=FILE[,FILE] draws beside this run's points on the PNG


@dataclass
class FrontierConfig:
    dataset: str = ""             # the eval_datasets entry judged (default: the original's first)
    within: float = 0.10          # the gap (nats) the largest N is named for
    plot: str = ""                # write gap against cache saved to this PNG


@dataclass
class RunsConfig:
    plot: str = ""                # write the curves to this PNG


@dataclass
class LayersConfig:
    out_dir: str = ""             # a train.py out_dir (its ckpt.pt and dataset) ...
    init_from: str = ""           # ... or hf:DIR (a Hugging Face LLaMA) or gguf:FILE
    dataset: str = ""             # the dataset to evaluate on (default: the checkpoint's)
    data_dir: str = ""            # where datasets live (default: the checkpoint's, else data)
    n_consumers: str = ""         # how many layers read another's, as echo:N counts: N, or a list N,N,... (costs once)
    n_sources: int = 0            # or: how many layers stay their own source (keep their own K/V, or attention)
    batches: int = 20             # val batches for the costs (first half of val)
    heldout_batches: int = 20     # val batches (second half) on which the chosen and fixed specs are judged
    similarity_batches: int = 4   # of the cost batches, for the similarities
    batch_size: int = 8
    block_size: int = 0           # context (default: the run's)
    seed: int = 1337
    device: str = "cpu"
    plot: str = ""                # write the four heat maps to this PNG
    save: str = ""                # write the costs, the chosen specs and their held-out losses to this JSON file


def main(argv):
    """analyze.py runs DIR [DIR ...] [--plot=PNG] | layers [config.py] --key=value ... | curve RUN ORIGINAL --key=value
    ... | frontier ORIGINAL RUN [RUN ...] --key=value ... (the module's docstring says what each prints)"""
    mode, rest = (argv[0], argv[1:]) if argv else ("", [])
    if mode == "runs":
        dirs = [a for a in rest if not a.startswith("--")]
        cfg = configure(RunsConfig(), [a for a in rest if a.startswith("--")])
        if not dirs:
            raise UsageError("analyze.py runs needs at least one train.py out_dir: analyze.py runs DIR [DIR ...]")
        runs_main(dirs, cfg)
    elif mode == "curve":
        curve_main([a for a in rest if not a.startswith("--")], configure(CurveConfig(), [a for a in rest if a.startswith("--")]))
    elif mode == "frontier":
        dirs = [a for a in rest if not a.startswith("--")]
        if not dirs:
            raise UsageError("analyze.py frontier needs train.py out_dirs: the original and the converted runs")
        frontier_main(dirs, configure(FrontierConfig(), [a for a in rest if a.startswith("--")]))
    elif mode == "layers":
        cfg = configure(LayersConfig(), rest)
        if ("n_consumers" in cfg.explicit) == ("n_sources" in cfg.explicit):
            raise UsageError("analyze.py layers needs --n_consumers=N[,N...] (layers that read another's, as echo:N "
                             "counts) or --n_sources=P (layers that keep their own), one of the two")
        layers_main(cfg)
    else:
        raise UsageError(f"unknown mode {mode!r}: expected 'runs' (analyze.py runs DIR ...), 'curve', 'frontier' "
                         f"(analyze.py frontier DIR ...) or 'layers' (analyze.py layers --key=value ...)")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
