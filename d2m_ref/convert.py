"""`python -m d2m_ref.convert`: a dense Llama / Qwen2 / Qwen3 checkpoint -> Dense2MoE (LF-UC), or one of
the two baselines (layer pruning, sparse upcycling), without training.

    python -m d2m_ref.convert --weights DENSE --method lfuc|prune|upcycle
        (--stats stats.json | --text FILE [--tokens N])
        (--remove-attention N | --latency-budget MS [--device D] [--format F] [--context C] | --plan plan.json)
        [--top-k K] [--routed-scaling S] [--no-norm-topk-prob] [--router centroid|zero]
        [--keep-attention first|last|strongest] [--experts E] --out DIR [--force]

spec/convert.md is the method, every choice and its reason (ours, never claimed as the paper's); the
functions below follow it section by section.  The output folder gets config.json (model_type
dense2moe with a `layer_plan`, or the source family for `prune`; `conversion` records the method,
the plan and the options), model.safetensors (written tensor by tensor: memory is one tensor, spec
§2.7) and the source's tokenizer.json.  Everything is written in a temporary folder beside DIR and
moved into place at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import roofline
from .calibrate import add_text_options, read_stats, stats_from_text
from .config import parse_config
from .errors import InputError, OutputExistsError
from .files import read_json, refuse_input
from .quant import is_quantized
from .safetensors_io import save_streaming
from .synth import to_storage
from .tokenizer import tokenizer_beside
from .weights import METADATA_CONFIG_KEY, Model, Param, canonical_params

METHODS = ("lfuc", "prune", "upcycle")
DENSE_FAMILIES = ("llama", "qwen2", "qwen3")  # what a Dense2MoE model's base_model_type may be
GROUP_SIZES = (2, 3, 4)  # automatic LF-UC groups (spec/convert.md §2.1); a --plan may use any size >= 1
KEEP_RULES = ("first", "last", "strongest")
ROUTERS = ("centroid", "zero")
UPCYCLE_SEED = 0


# ---------------------------------------------------------------------------------------------
# Plans (spec/convert.md §2.1, §3, §4)


@dataclass(frozen=True)
class Group:
    """LF-UC: contiguous source layers fused into one layer; `attention` is the source layer whose
    attention block is kept, the group's MLPs become the experts in this order."""

    layers: tuple[int, ...]
    attention: int


@dataclass(frozen=True)
class Plan:
    method: str
    groups: tuple[Group, ...] = ()  # lfuc
    drop: tuple[int, ...] = ()  # prune
    upcycle: tuple[int, ...] = ()  # upcycle
    reason: str = ""  # how it was chosen

    def as_dict(self) -> dict:
        if self.method == "lfuc":
            return {"method": "lfuc", "groups": [{"layers": list(g.layers), "attention": g.attention}
                                                 for g in self.groups]}
        if self.method == "prune":
            return {"method": "prune", "drop": list(self.drop)}
        return {"method": "upcycle", "layers": list(self.upcycle)}

    def removed_attention(self) -> int:
        if self.method == "lfuc":
            return sum(len(g.layers) - 1 for g in self.groups)
        return len(self.drop)


def span_cost(stats: dict, first: int, n: int) -> float:
    """§2.1: the cost of fusing layers first .. first+n−1, the angular distance across them: every
    fused MLP and the kept attention read the group's input instead of their own, and the residual
    moves that far inside the group."""
    return float(stats["layers"][first]["angular_distance"][n - 1])


def lfuc_groups(stats: dict, L: int, remove: int, *, sizes=GROUP_SIZES, keep_ends: bool = True) -> list[tuple[int, ...]]:
    """§2.1: disjoint contiguous groups (sizes in `sizes`) removing exactly `remove` attentions at the
    least total span_cost; layers 0 and L−1 stay out when keep_ends.  Dynamic programming over the
    layers; ties go to the earlier grouping.  InputError if no grouping removes that many."""
    lo, hi = (1, L - 1) if keep_ends else (0, L)
    inf = float("inf")
    # best[i][r]: least cost of removing r attentions using layers i .. hi−1; choice[i][r] the first step
    best = [[inf] * (remove + 1) for _ in range(hi + 1)]
    choice: list[list[int]] = [[0] * (remove + 1) for _ in range(hi + 1)]
    best[hi][0] = 0.0
    for i in range(hi - 1, lo - 1, -1):
        for r in range(remove + 1):
            best[i][r], choice[i][r] = best[i + 1][r], 0  # layer i stays as it is
            for n in sizes:
                if i + n <= hi and n - 1 <= r and best[i + n][r - n + 1] < inf:
                    cost = span_cost(stats, i, n) + best[i + n][r - n + 1]
                    if cost < best[i][r]:
                        best[i][r], choice[i][r] = cost, n
    if remove < 0 or best[lo][remove] == inf:
        most = (hi - lo) - -(-(hi - lo) // max(sizes)) if hi > lo else 0
        raise InputError(f"--remove-attention {remove}: groups of {min(sizes)}-{max(sizes)} layers within layers "
                         f"{lo}..{hi - 1} remove at most {most} attentions")
    groups, i, r = [], lo, remove
    while i < hi:
        n = choice[i][r]
        if n:
            groups.append(tuple(range(i, i + n)))
            i, r = i + n, r - n + 1
        else:
            i += 1
    return groups


def kept_attention(layers: tuple[int, ...], rule: str, stats: dict | None) -> int:
    """§2.2: which source layer's attention a group keeps.  first: the only one whose input in the
    fused model is the input it had (default); last; strongest: the lowest attention-drop score
    (the attention that turns the residual most on the calibration text)."""
    if rule == "first":
        return layers[0]
    if rule == "last":
        return layers[-1]
    if stats is None:
        raise InputError("--keep-attention strongest reads calibration statistics: give --stats or --text")
    return min(layers, key=lambda i: (stats["layers"][i]["attention_drop"], i))


def prune_layers(stats: dict, L: int, remove: int, keep_ends: bool = True) -> tuple[int, ...]:
    """§3: the `remove` layers of lowest Block Influence (ties: the earlier), first and last kept."""
    pool = range(1, L - 1) if keep_ends else range(L)
    if not 0 < remove <= len(pool) - (0 if keep_ends else 1):
        raise InputError(f"--remove-attention {remove}: pruning can drop 1..{len(pool) - (0 if keep_ends else 1)} "
                         f"of this model's {L} layers (first and last kept)")
    ranked = sorted(pool, key=lambda i: (stats["layers"][i]["block_influence"], i))
    return tuple(sorted(ranked[:remove]))


def plan_from_file(path: Path, L: int) -> Plan:
    """A --plan JSON file, checked against a model of L layers (spec/convert.md §2.6)."""
    doc = read_json(path, "--plan")
    where = f"--plan {path}"
    if not isinstance(doc, dict) or doc.get("method") not in METHODS:
        raise InputError(f"{where}: expected an object with \"method\" one of {list(METHODS)}")
    method = doc["method"]
    expected = {"lfuc": {"method", "groups"}, "prune": {"method", "drop"}, "upcycle": {"method", "layers"}}[method]
    if set(doc) != expected:
        raise InputError(f"{where}: a {method} plan has exactly the keys {sorted(expected)}, found {sorted(doc)}")
    if method == "lfuc":
        groups = []
        for k, g in enumerate(_list(doc["groups"], f"{where}: groups")):
            if not isinstance(g, dict) or set(g) != {"layers", "attention"}:
                raise InputError(f"{where}: groups[{k}] must be {{\"layers\": [...], \"attention\": i}}")
            layers = tuple(_layer_ids(g["layers"], L, f"{where}: groups[{k}].layers"))
            if not layers or list(layers) != list(range(layers[0], layers[0] + len(layers))):
                raise InputError(f"{where}: groups[{k}].layers {list(layers)} must be contiguous and increasing")
            if isinstance(g["attention"], bool) or g["attention"] not in layers:
                raise InputError(f"{where}: groups[{k}].attention {g['attention']!r} must be one of its layers "
                                 f"{list(layers)} (the source of the kept attention)")
            groups.append(Group(layers, g["attention"]))
        _disjoint([g.layers for g in groups], where)
        return Plan("lfuc", groups=tuple(sorted(groups, key=lambda g: g.layers[0])), reason=f"--plan {path}")
    ids = _layer_ids(doc["drop" if method == "prune" else "layers"], L, f"{where}: {method}")
    _disjoint([(i,) for i in ids], where)
    if method == "prune":
        if len(ids) >= L:
            raise InputError(f"{where}: drop names all {L} layers")
        return Plan("prune", drop=tuple(sorted(ids)), reason=f"--plan {path}")
    return Plan("upcycle", upcycle=tuple(sorted(ids)), reason=f"--plan {path}")


def _list(x, where: str) -> list:
    if not isinstance(x, list) or not x:
        raise InputError(f"{where} must be a non-empty list")
    return x


def _layer_ids(x, L: int, where: str) -> list[int]:
    ids = _list(x, where)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L:
            raise InputError(f"{where}: {i!r} is not a layer of this model (0..{L - 1})")
    return ids


def _disjoint(groups: list[tuple[int, ...]], where: str) -> None:
    seen: dict[int, int] = {}
    for k, g in enumerate(groups):
        for i in g:
            if i in seen:
                raise InputError(f"{where}: layer {i} appears twice (entries {seen[i]} and {k})")
            seen[i] = k


# ---------------------------------------------------------------------------------------------
# Weights (spec/convert.md §2.3, §2.4, §4)


def fold_norm(w: np.ndarray, norm_weight: np.ndarray) -> np.ndarray:
    """§2.3 [F, H], [H] -> [F, H]: W·diag(w), so W·(w ⊙ x̂) = (W·diag(w))·x̂ exactly in real arithmetic."""
    return w * norm_weight[None, :]


def centroid_router(centroids: np.ndarray) -> np.ndarray:
    """§2.4 [E, H] -> [E, H]: the mean-centred centroids c_j − mean_j c_j, the rows of W_router."""
    return centroids - centroids.mean(axis=0, keepdims=True)


def upcycle_router(E: int, H: int, layer: int) -> np.ndarray:
    """§4 [E, H]: rows drawn from N(0, 1/H), seeded by (UPCYCLE_SEED, layer) — as sparse upcycling
    initialises a router; with norm_topk_prob the output does not depend on it (every expert is the
    same MLP)."""
    return np.random.default_rng([UPCYCLE_SEED, layer]).normal(0.0, 1.0 / np.sqrt(H), size=(E, H))


def stored(x: np.ndarray, storage: str, name: str) -> np.ndarray:
    """A float64 tensor -> its storage array (BF16 as uint16 bits), rounded once; InputError if it
    does not fit (float16 overflow)."""
    out = to_storage(np.ascontiguousarray(x, np.float64), storage)
    if storage in ("F32", "F16") and not np.isfinite(out).all():
        raise InputError(f"{name}: a folded value overflows {storage} (largest |x| = {np.abs(x).max():.4g})")
    return out


# ---------------------------------------------------------------------------------------------
# The converted model


@dataclass(frozen=True)
class Options:
    top_k: int | str = 1  # an int or "all" (§2.5)
    routed_scaling: float | None = None
    norm_topk_prob: bool = True
    router: str = "centroid"
    keep_attention: str = "first"
    experts: int = 4  # upcycle
    extra: dict = field(default_factory=dict)


def check_source(model: Model) -> None:
    """A dense model of a family a Dense2MoE model can be based on, in a float storage."""
    cfg = model.config
    if cfg.family not in DENSE_FAMILIES or any(not s.attention or s.moe is not None for s in cfg.layers):
        raise InputError(f"--weights: a dense {'/'.join(DENSE_FAMILIES)} model is converted; this one is "
                         f"{cfg.family}" + (" with MoE or attention-free layers" if cfg.family in DENSE_FAMILIES else ""))
    for name, p in canonical_params(model):
        if is_quantized(p.storage):
            raise InputError(f"--weights: {name} is quantised ({p.storage}): convert the float checkpoint, "
                             "then quantize the result")


def float_storage(p: Param) -> str:
    """The storage a tensor computed from `p` is written in: its own, F32 for GGUF block types."""
    return "F32" if p.storage.startswith("GGUF_") else p.storage


class Builder:
    """The converted model, layer by layer: `specs` (name, storage, shape) of the output tensors in
    order and `produce[name]()` their storage arrays (called once, while writing: spec §2.7), and
    the `layer_plan` entries."""

    def __init__(self, model: Model, stats: dict | None, opts: Options):
        self.cfg, self.src = model.config, dict(canonical_params(model))
        self.stats, self.opts = stats, opts
        self.specs: list[tuple[str, str, tuple[int, ...]]] = []
        self.produce: dict = {}
        self.entries: list[dict] = []

    # -- tensors ------------------------------------------------------------------------------
    def add(self, name: str, storage: str, shape: tuple[int, ...], produce) -> None:
        self.specs.append((name, storage, tuple(shape)))
        self.produce[name] = produce

    def copy(self, name: str, p: Param) -> None:
        """A source tensor unchanged (GGUF block types as F32, as import_gguf writes them)."""
        storage = float_storage(p)
        produce = p.raw if storage == p.storage else lambda: np.ascontiguousarray(p.load(np.float32))
        self.add(name, storage, p.shape, produce)

    def computed(self, name: str, like: Param, shape: tuple[int, ...], value) -> None:
        """A tensor computed in float64 by value(), stored like `like`."""
        storage = float_storage(like)
        self.add(name, storage, shape, lambda: stored(value(), storage, name))

    def copy_layer(self, i: int, j: int, parts: tuple[str, ...]) -> None:
        """Source layer i's tensors whose names (after the layer prefix) start with `parts`, as layer j's."""
        prefix = f"model.layers.{i}."
        for name, p in self.src.items():
            if name.startswith(prefix) and name[len(prefix):].startswith(parts):
                self.copy(f"model.layers.{j}." + name[len(prefix):], p)

    def top_k(self, E: int) -> int:
        """§2.5: --top-k for a layer of E experts."""
        K = E if self.opts.top_k == "all" else self.opts.top_k
        if not 1 <= K <= E:
            raise InputError(f"--top-k {K}: a layer of {E} experts takes 1..{E}")
        return K

    def moe_entry(self, sources: list[int], attention: int, K: int, scale: float) -> dict:
        """A layer_plan entry (§2.5); `scale` is the routed_scaling_factor unless --routed-scaling gives one."""
        return {"attention": True, "ffn": "moe", "num_experts": len(sources), "num_experts_per_tok": K,
                "moe_intermediate_size": self.cfg.layers[sources[0]].intermediate_size, "scoring_func": "softmax",
                "norm_topk_prob": self.opts.norm_topk_prob,
                "routed_scaling_factor": self.opts.routed_scaling if self.opts.routed_scaling is not None else scale,
                "source_layers": sources, "attention_source": attention}

    # -- layers ---------------------------------------------------------------------------------
    def fused(self, g: Group, j: int) -> None:
        """§2.2–2.5: one layer from a group."""
        src, H = self.src, self.cfg.hidden_size
        first = f"model.layers.{g.layers[0]}."
        self.copy_layer(g.attention, j, ("input_layernorm.", "self_attn."))
        self.computed(f"model.layers.{j}.post_attention_layernorm.weight", src[first + "post_attention_layernorm.weight"],
                      (H,), lambda: np.ones(H))
        if self.opts.router == "centroid":
            if self.stats is None:
                raise InputError("the centroid router reads calibration statistics: give --stats or --text "
                                 "(or --router zero)")
            rows = centroid_router(np.asarray(self.stats["ffn_input_centroids"], np.float64)[list(g.layers)])
        else:
            rows = np.zeros((len(g.layers), H))
        self.computed(f"model.layers.{j}.mlp.gate.weight", src[first + "mlp.gate_proj.weight"], rows.shape, lambda: rows)
        for e, i in enumerate(g.layers):
            norm = src[f"model.layers.{i}.post_attention_layernorm.weight"]
            for proj in ("gate_proj", "up_proj"):
                p = src[f"model.layers.{i}.mlp.{proj}.weight"]
                self.computed(f"model.layers.{j}.mlp.experts.{e}.{proj}.weight", p, p.shape,
                              lambda p=p, norm=norm: fold_norm(p.load(np.float64), norm.load(np.float64)))
            self.copy(f"model.layers.{j}.mlp.experts.{e}.down_proj.weight", src[f"model.layers.{i}.mlp.down_proj.weight"])
        K = self.top_k(len(g.layers))
        self.entries.append(self.moe_entry(list(g.layers), g.attention, K, float(K)))  # each chosen expert ~ weight 1

    def upcycled(self, i: int, j: int) -> None:
        """§4: layer i with its MLP copied into E experts."""
        E, H, src = self.opts.experts, self.cfg.hidden_size, self.src
        self.copy_layer(i, j, ("input_layernorm.", "self_attn.", "post_attention_layernorm."))
        rows = upcycle_router(E, H, i)
        self.computed(f"model.layers.{j}.mlp.gate.weight", src[f"model.layers.{i}.mlp.gate_proj.weight"], rows.shape,
                      lambda: rows)
        for e in range(E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                self.copy(f"model.layers.{j}.mlp.experts.{e}.{proj}.weight", src[f"model.layers.{i}.mlp.{proj}.weight"])
        self.entries.append(self.moe_entry([i] * E, i, self.top_k(E), 1.0))  # copies: weights summing to 1 = the MLP

    def kept(self, i: int, j: int) -> None:
        """Layer i as it is."""
        self.copy_layer(i, j, ("input_layernorm.", "self_attn.", "post_attention_layernorm.", "mlp."))
        self.entries.append({"attention": True, "ffn": "dense", "source_layers": [i], "attention_source": i})


def build(model: Model, plan: Plan, stats: dict | None, opts: Options) -> tuple[dict, Builder]:
    """(config dict, Builder holding the tensors) of the converted model: embeddings, the layers in
    order (a group fused where it starts, dropped layers skipped), final norm, LM head if untied."""
    b = Builder(model, stats, opts)
    b.copy("model.embed_tokens.weight", b.src["model.embed_tokens.weight"])
    fused = {g.layers[0]: g for g in plan.groups}
    i = 0
    while i < model.config.num_hidden_layers:
        j = len(b.entries)
        if i in fused:
            b.fused(fused[i], j)
            i += len(fused[i].layers)
            continue
        if i in plan.upcycle:
            b.upcycled(i, j)
        elif i not in plan.drop:
            b.kept(i, j)
        i += 1
    b.copy("model.norm.weight", b.src["model.norm.weight"])
    if "lm_head.weight" in b.src:
        b.copy("lm_head.weight", b.src["lm_head.weight"])
    return new_config(model, plan, b.entries, opts), b


def new_config(model: Model, plan: Plan, entries: list[dict], opts: Options) -> dict:
    """§2.7: the source config with the new layer count; dense2moe with its layer_plan unless pruned."""
    source = {k: v for k, v in model.config.source.items() if k not in ("architectures", "layer_plan")}
    conversion = {"method": plan.method, "plan": plan.as_dict(), "chosen_by": plan.reason,
                  "removed_attention": plan.removed_attention(), **opts.extra}
    if plan.method == "prune":
        return {**source, "num_hidden_layers": len(entries), "conversion": conversion}
    return {**source, "model_type": "dense2moe", "base_model_type": model.config.family,
            "num_hidden_layers": len(entries), "layer_plan": entries, "conversion": conversion}


# ---------------------------------------------------------------------------------------------
# Output folder


def write_folder(out: Path, force: bool, config: dict, writer: Builder, tokenizer: Path | None,
                 inputs=()) -> None:
    """config.json, model.safetensors and tokenizer.json written in a temporary folder beside `out`,
    then moved into place; on any failure the temporary folder goes and `out` is as it was.  None of
    them may be one of the command's `inputs` ((what, path) pairs), --force or not."""
    out = Path(out)
    names = ["config.json", "model.safetensors"] + (["tokenizer.json"] if tokenizer is not None else [])
    for n in names:
        refuse_input(out / n, "--out", inputs)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise OutputExistsError(f"--out {out}: holds {', '.join(clash)}; pass --force to overwrite")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        text = json.dumps(config, indent=2) + "\n"
        (tmp / "config.json").write_text(text, encoding="utf-8")
        save_streaming(tmp / "model.safetensors", writer.specs, lambda n: writer.produce[n](),
                       metadata={METADATA_CONFIG_KEY: json.dumps(config)})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        if not out.exists():
            os.rename(tmp, out)
            return
        for n in names:
            os.replace(tmp / n, out / n)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def source_tokenizer(args: argparse.Namespace, model: Model) -> Path | None:
    """The tokenizer.json to copy: --tokenizer, else the one beside the weights (a GGUF's own
    vocabulary is not copied: tokenize with the GGUF, or import_gguf first)."""
    if args.tokenizer is not None:
        return args.tokenizer
    return tokenizer_beside(args.weights)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_model_options
    parser = argparse.ArgumentParser(prog="python -m d2m_ref.convert",
                                     description="Convert a dense model to Dense2MoE (spec/convert.md).")
    add_model_options(parser, weights_required=True)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--stats", type=Path, metavar="stats.json", help="from python -m d2m_ref.calibrate")
    add_text_options(parser, required=False)
    parser.add_argument("--remove-attention", type=int, metavar="N",
                        help="the budget: attention blocks to remove (lfuc: in groups of 2-4; prune: whole layers)")
    parser.add_argument("--latency-budget", type=float, metavar="MS",
                        help="instead of --remove-attention: the fewest removals whose modelled decode ms/token "
                             "(spec/roofline.md) on --device in --format at --context is at most MS")
    parser.add_argument("--device", choices=[d.name for d in roofline.DEVICES], default="orin-agx-64")
    parser.add_argument("--format", choices=tuple(roofline.FORMAT_STORAGE), default="bf16",
                        help="weight format of the latency budget (default bf16)")
    parser.add_argument("--context", type=int, default=1024, metavar="C", help="context of the latency budget")
    parser.add_argument("--plan", type=Path, metavar="plan.json", help="the plan itself (spec/convert.md §2.6)")
    parser.add_argument("--top-k", type=top_k_option, default=1, metavar="K|all",
                        help="experts per token (default 1; 'all': every expert)")
    parser.add_argument("--routed-scaling", type=float, metavar="S", help="routed_scaling_factor (lfuc: K; upcycle: 1)")
    parser.add_argument("--no-norm-topk-prob", action="store_true", help="keep the softmax probabilities unnormalised")
    parser.add_argument("--router", choices=ROUTERS, default="centroid", help="lfuc router init (default centroid)")
    parser.add_argument("--keep-attention", choices=KEEP_RULES, default="first",
                        help="which attention an lfuc group keeps (default first)")
    parser.add_argument("--experts", type=int, default=4, metavar="E", help="upcycle: experts per layer (default 4)")
    parser.add_argument("--keep-ends", choices=("yes", "no"), default="yes",
                        help="keep the first and last layers out of groups and pruning (default yes)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="overwrite files in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def top_k_option(text: str) -> int | str:
    if text == "all":
        return text
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer or 'all'") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"{k}: a positive integer or 'all'")
    return k


def choose_plan(args: argparse.Namespace, model: Model, stats: dict | None) -> Plan:
    L = model.config.num_hidden_layers
    if args.plan is not None:
        plan = plan_from_file(args.plan, L)
        if plan.method != args.method:
            raise InputError(f"--plan {args.plan} is a {plan.method} plan, --method is {args.method}")
        return plan
    keep_ends = args.keep_ends == "yes"
    if args.method == "upcycle":
        layers = tuple(range(1, L - 1) if keep_ends else range(L))
        return Plan("upcycle", upcycle=layers, reason="every layer" + (" but the first and last" if keep_ends else ""))
    if args.remove_attention is None:
        raise InputError(f"--method {args.method} needs a budget: --remove-attention N (or a --plan)")
    if stats is None:
        raise InputError("choosing the plan reads calibration statistics: give --stats or --text (or a --plan)")
    if args.method == "prune":
        return Plan("prune", drop=prune_layers(stats, L, args.remove_attention, keep_ends),
                    reason=f"the {args.remove_attention} layers of lowest block influence")
    groups = lfuc_groups(stats, L, args.remove_attention, keep_ends=keep_ends)
    return Plan("lfuc", groups=tuple(Group(g, kept_attention(g, args.keep_attention, stats)) for g in groups),
                reason=f"least angular distance removing {args.remove_attention} attentions")


def modelled_ms(config: dict, args: argparse.Namespace) -> float:
    """spec/roofline.md: the modelled decode ms/token of a config on --device in --format at --context."""
    device = next(d for d in roofline.DEVICES if d.name == args.device)
    nbytes = roofline.bytes_per_token(parse_config(config, "the converted config"), args.format, args.context)
    return roofline.ms_per_token(nbytes, device.bandwidth_gbps)


def plan_for_latency(args: argparse.Namespace, model: Model, stats: dict | None, opts: Options) -> Plan:
    """§2.1: the smallest --remove-attention whose converted model's modelled decode time meets
    --latency-budget; InputError when the dense model already does or no budget the method allows does."""
    budget, where = args.latency_budget, f"{args.device}, {args.format}, context {args.context}"
    dense = modelled_ms(model.config.source, args)
    if dense <= budget:
        raise InputError(f"--latency-budget {budget} ms: the dense model already takes {dense:.3f} ms ({where})")
    n, best = 1, dense
    while True:
        args.remove_attention = n
        try:
            plan = choose_plan(args, model, stats)
        except InputError as exc:
            if n == 1:
                raise
            raise InputError(f"--latency-budget {budget} ms cannot be met ({where}): removing {n - 1} attention "
                             f"blocks, the most {args.method} can, gives {best:.3f} ms") from exc
        best = modelled_ms(build(model, plan, stats, opts)[0], args)
        if best <= budget:
            return Plan(plan.method, plan.groups, plan.drop, plan.upcycle,
                        f"{plan.reason}: the fewest that meet {budget} ms ({best:.3f} ms, {where})")
        n += 1


def run(args: argparse.Namespace) -> int:
    from .cli import load_model_checked, model_files
    if args.stats is not None and args.text is not None:
        raise InputError("give --stats or --text, not both")
    if args.latency_budget is not None and (args.remove_attention is not None or args.plan is not None
                                            or args.method == "upcycle"):
        raise InputError("--latency-budget chooses --remove-attention for lfuc or prune: give one budget, no --plan")
    if args.latency_budget is not None and args.latency_budget <= 0:
        raise InputError(f"--latency-budget {args.latency_budget}: a positive number of milliseconds")
    if args.experts < 1:
        raise InputError(f"--experts {args.experts}: give a positive number")
    model = load_model_checked(args)
    try:
        check_source(model)
        if args.stats is not None:
            stats = read_stats(args.stats, model)
            stats_from = {"stats": args.stats.name, "stats_sha256": hashlib.sha256(args.stats.read_bytes()).hexdigest()}
        elif args.text is not None:
            stats = stats_from_text(args, model)
            stats_from = {"text": args.text.name, "text_sha256": stats["text"]["sha256"], "tokens": stats["tokens"]}
        else:
            stats, stats_from = None, {}
        opts = Options(top_k=args.top_k, routed_scaling=args.routed_scaling, norm_topk_prob=not args.no_norm_topk_prob,
                       router=args.router, keep_attention=args.keep_attention, experts=args.experts,
                       extra={"calibration": stats_from, "router": args.router if args.method == "lfuc" else None})
        if args.latency_budget is not None:
            plan = plan_for_latency(args, model, stats, opts)
        else:
            plan = choose_plan(args, model, stats)
        config, writer = build(model, plan, stats, opts)
        parse_config(config, "the converted config")  # what we write must load
        inputs = model_files(args, model) + [("the stats", args.stats), ("the text", args.text), ("the plan", args.plan)]
        write_folder(args.out, args.force, config, writer, source_tokenizer(args, model), inputs)
    finally:
        model.close()
    print(f"wrote {args.out}: {args.method}, {config['num_hidden_layers']} layers "
          f"({plan.removed_attention()} attention blocks removed; {plan.reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli
    return cli.main_with_status(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
