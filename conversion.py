"""Converting a model to K/V or attention sharing while it trains, the whole story in one place.

One shot: `--kv_share=SPEC` / `--att_share=SPEC` on a loaded model converts it before training starts
(convert_on_load). Layer-wise, our reconstruction of ECHO's "gradually converting pretrained LLaMA":
`--kv_share_target=SPEC` / `--att_share_target=SPEC` convert the target's consumers from the top layer down,
1, then 2, 4, ... of them, `adapt_iters` iterations per stage, then fine-tune the whole model to max_iters.
The schedule is plain data (adaptation_stages), saved in every checkpoint, so a resume continues it exactly.
"""
import types

from model import convert_sharing, projection_owner, resolve_sharing


def convert_on_load(model, cfg):
    """The one-shot conversion a fine-tune asks for: kv_share / att_share given explicitly (on the command line
    or in a config file); a spec not given keeps the sharing the model has. A layer-wise target converts in
    stages instead, so it leaves the model as it is."""
    if cfg.kv_share_target or cfg.att_share_target:
        return model
    specs = {k: getattr(cfg, k) if k in cfg.explicit else getattr(model.config, k) for k in ("kv_share", "att_share")}
    wanted = resolve_sharing(types.SimpleNamespace(**specs, n_layer=model.config.n_layer))
    if (model.kv_sources, model.att_sources) == wanted:
        return model
    return convert_sharing(model, **specs, kv_init=cfg.kv_init)


def adaptation_stages(start, kv_target="", att_target="", freeze=False):
    """The layer-wise conversion schedule as plain data: a list of stages, each a dict with the model's
    kv_sources and att_sources during the stage and whether only the converted layers train ("freeze").

    The target's consumers (layers that read another layer's K/V or attention) are converted from the top
    layer down: the first stage converts 1 of them, the next 2, then 4, ... (cumulative counts: each stage
    keeps the conversions before it), the last adaptation stage all of them. The final entry is the full
    fine-tuning at the target (never frozen). start: the model's {"kv_sources", "att_sources"}; a target
    not given keeps the start's sharing of that kind. A layer not yet converted keeps its sources from
    start, except that what it computes in the target it computes from the first stage on (in a model that
    already shares, a target source may be a consumer, and a converted layer must read a layer that computes)."""
    if not (kv_target or att_target):  # nothing to convert: one stage, the model as it is
        return [{"kv_sources": start["kv_sources"], "att_sources": start["att_sources"], "freeze": False}]
    n = len(start["kv_sources"])
    spec = lambda target, key: target or ",".join(map(str, start[key]))  # noqa: E731
    kv, att = resolve_sharing(types.SimpleNamespace(kv_share=spec(kv_target, "kv_sources"),
                                                    att_share=spec(att_target, "att_sources"), n_layer=n))
    target = {"kv_sources": kv, "att_sources": att}
    consumers = [i for i in reversed(range(n)) if kv[i] != i or att[i] != i]
    counts = [2 ** k for k in range(len(consumers).bit_length()) if 2 ** k < len(consumers)] + [len(consumers)]

    def stage(converted, frozen):
        return {key: [target[key][i] if i in converted else i if target[key][i] == i else start[key][i]
                      for i in range(n)] for key in target} | {"freeze": frozen}

    return [stage(consumers[:c], freeze) for c in counts if c] + [stage(consumers, False)]


def run_stages(model, cfg, ckpt):
    """The stages of this run: a resumed run's own (saved in its checkpoint, older formats included), else
    built from the model as loaded and the targets."""
    if ckpt and ckpt.get("adapt_stages"):
        return legacy_stages(ckpt["adapt_stages"], model.config.n_layer, cfg.adapt_freeze)
    return adaptation_stages({"kv_sources": model.kv_sources, "att_sources": model.att_sources},
                             cfg.kv_share_target, cfg.att_share_target, cfg.adapt_freeze)


def legacy_stages(stages, n_layer, freeze):
    """A checkpoint written before attention sharing stored only the adaptation stages' kv_sources."""
    if stages and isinstance(stages[0], dict):
        return stages
    final = {"kv_sources": stages[-1], "att_sources": list(range(n_layer)), "freeze": False}
    return [dict(final, kv_sources=s, freeze=freeze) for s in stages] + [final]


def stage_at(iter_num, stages, adapt_iters):
    """The stage iteration iter_num trains in: adapt_iters each, the last (full fine-tuning) to the end."""
    final = len(stages) - 1
    return min(iter_num // adapt_iters, final) if adapt_iters else final


def resumed_stage(ckpt, iter_num, stages, adapt_iters):
    """The stage a resumed run's model and optimizer state belong to. Usually stage_at(iter_num), but a
    checkpoint written at the first eval of a new stage was saved before the model entered it (the switch
    happens just after the eval), so it records the old stage, and the run re-enters the new one after it."""
    return ckpt.get("stage", stage_at(iter_num, stages, adapt_iters)) if ckpt else stage_at(iter_num, stages, adapt_iters)


def enter_stage(model, stage, kv_init):
    """Convert the model to the stage's sources (if it is not there yet) and set what trains: all of it,
    or when the stage freezes, only the converted layers and the projections they now read."""
    if (model.kv_sources, model.att_sources) != (stage["kv_sources"], stage["att_sources"]):
        model = convert_sharing(model, ",".join(map(str, stage["kv_sources"])),
                                ",".join(map(str, stage["att_sources"])), kv_init)
    n = len(model.layers)
    converted = {i for i in range(n) if model.kv_sources[i] != i or model.att_sources[i] != i}
    read = {f"layers.{projection_owner(model, i, w)}.attention.{w}." for i in converted for w in ("wq", "wk", "wv")}
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        p.requires_grad_(not stage["freeze"] or layer in converted or any(name.startswith(r) for r in read))
    return model

