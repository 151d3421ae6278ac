"""Weights: a typed container of lazy tensors, checked name by name against the config.

Implements spec/format.md §1 (checkpoint tensor names).  Every tensor stays in its storage format
(memory-mapped safetensors, or an in-memory array) until an op asks for it in the compute dtype:
`Param.load(dtype)` converts that one matrix, the caller drops it after use, so no full-precision
copy of the model ever exists (spec/architecture.md §6, streaming).  Vectors (norm weights,
biases: a few KB each, read by every decode step) are the exception: converted once and kept.
Quantised weights (storage Q8 / Q4G{32,64,128}, spec/quant.md) keep both parts mapped and
dequantise the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import gguf_io, quant
from .config import LayerSpec, ModelConfig, MoESpec, load_config, parse_config, parse_json
from .errors import ConfigError, WeightsError
from .safetensors_io import DTYPES, Checkpoint, to_float

FLOAT_STORAGE = ("F64", "F32", "F16", "BF16")
_NUMPY_STORAGE = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                  np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8"}  # I8 / U8: parts of quantised weights


@dataclass(frozen=True, eq=False)
class Param:
    """One weight matrix or vector in its storage format.

    `raw()` gives the storage array (BF16 as uint16 bits) without copying; `load(dtype)` converts
    all of it, `rows(lo, hi, dtype)` a block of rows, `take(ids, dtype)` chosen rows (embedding).
    Quantised (storage Q8 or Q4G{G}, spec/quant.md): `raw()` is the int8 / packed uint8 tensor,
    `scales()` its scales, and the three converters dequantise (d2m_ref.quant.dequantize).
    """

    name: str
    storage: str  # safetensors dtype string F64 | F32 | F16 | BF16, or Q8 | Q4G32 | Q4G64 | Q4G128
    shape: tuple[int, ...]
    _raw: Callable[[], np.ndarray]
    _scales: Callable[[], np.ndarray] | None = None  # quantised storage only
    # GGUF block types (storage GGUF_Q4_K, ...; spec/format.md §3): raw rows -> float32 rows, the
    # gguf package's dequantiser.  raw() is then [rows, bytes per row] uint8.
    _decode: Callable[[np.ndarray], np.ndarray] | None = None
    # vectors only (norm weights, biases; a few KB each): dtype -> the converted copy, read-only
    _vectors: dict = field(default_factory=dict, repr=False)

    def raw(self) -> np.ndarray:
        return self._raw()

    def scales(self) -> np.ndarray:
        if self._scales is None:
            raise WeightsError(f"{self.name}: storage {self.storage} has no scales")
        return self._scales()

    def load(self, dtype: np.dtype) -> np.ndarray:
        if len(self.shape) == 1:  # every decode step reads them: converted once, a copy kept
            key = np.dtype(dtype)
            vector = self._vectors.get(key)
            if vector is None:
                vector = np.array(self._convert(key), dtype=key)  # a copy: no view of the mapped file
                vector.setflags(write=False)
                self._vectors[key] = vector
            return vector
        return self._convert(dtype)

    def _convert(self, dtype: np.dtype) -> np.ndarray:
        if self._scales is not None:
            return quant.dequantize(self.storage, self._raw(), self._scales(), self.shape[-1], dtype)
        if self._decode is not None:
            return to_float(self._decoded(self._raw()), "F32", dtype)
        return to_float(self._raw(), self.storage, dtype)

    def rows(self, lo: int, hi: int, dtype: np.dtype) -> np.ndarray:
        if self._scales is not None:
            return quant.dequantize(self.storage, self._raw()[lo:hi], self._scales()[lo:hi], self.shape[-1], dtype)
        if self._decode is not None:
            return to_float(self._decoded(self._raw()[lo:hi]), "F32", dtype)
        return to_float(self._raw()[lo:hi], self.storage, dtype)

    def take(self, ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
        if self._scales is not None:
            return quant.dequantize(self.storage, self._raw()[ids], self._scales()[ids], self.shape[-1], dtype)
        if self._decode is not None:
            return to_float(self._decoded(self._raw()[ids]), "F32", dtype)
        return to_float(self._raw()[ids], self.storage, dtype)

    def _decoded(self, rows: np.ndarray) -> np.ndarray:
        """GGUF block rows [..., bytes] -> float32 [..., cols], checked (a dequantiser is not ours)."""
        out = np.asarray(self._decode(rows), dtype=np.float32)
        if out.shape != (*rows.shape[:-1], self.shape[-1]):
            raise WeightsError(f"{self.name}: {self.storage} rows decode to shape {list(out.shape)}, expected "
                               f"{[*rows.shape[:-1], self.shape[-1]]}")
        return out

    @property
    def nbytes(self) -> int:
        if self._scales is not None:
            return quant.storage_nbytes(self.storage, self.shape)
        if self._decode is not None:
            return int(self._raw().nbytes)
        return int(np.prod(self.shape)) * (8 if self.storage == "F64" else 4 if self.storage == "F32" else 2)

    @staticmethod
    def of(name: str, array: np.ndarray, storage: str | None = None) -> "Param":
        """An in-memory Param.  float arrays keep their dtype; bf16 is given as uint16 bits + 'BF16'."""
        array = np.ascontiguousarray(array)
        storage = storage or _NUMPY_STORAGE.get(array.dtype)
        if storage is None:
            raise WeightsError(f"{name}: cannot hold a {array.dtype} array as a weight")
        array.setflags(write=False)
        return Param(name, storage, tuple(array.shape), lambda: array)

    @staticmethod
    def quantized(name: str, storage: str, shape: tuple[int, int], q: np.ndarray, scales: np.ndarray) -> "Param":
        """An in-memory quantised Param from its two parts (d2m_ref.quant.quantize's output)."""
        if not quant.is_quantized(storage):
            raise WeightsError(f"{name}: {storage!r} is not a quantised storage ({', '.join(quant.STORAGE)})")
        (qdt, qshape), (sdt, sshape) = quant.part_specs(storage, tuple(shape))
        q, scales = np.ascontiguousarray(q), np.ascontiguousarray(scales)
        for part, arr, dt, want in (("values", q, qdt, qshape), ("scales", scales, sdt, sshape)):
            if arr.dtype != DTYPES[dt] or arr.shape != want:
                raise WeightsError(f"{name}: {storage} {part} must be {dt} {list(want)}, found {arr.dtype} "
                                   f"{list(arr.shape)}")
            arr.setflags(write=False)
        return Param(name, storage, tuple(shape), lambda: q, lambda: scales)


@dataclass(frozen=True)
class AttentionWeights:
    """Weights of one attention block (spec §3)."""

    norm: Param  # input_layernorm [H]
    q: Param  # [Nh·D, H]
    k: Param  # [Nkv·D, H]
    v: Param  # [Nkv·D, H]
    o: Param  # [H, Nh·D]
    q_bias: Param | None = None
    k_bias: Param | None = None
    v_bias: Param | None = None
    o_bias: Param | None = None
    q_norm: Param | None = None  # [D] (per head) or [Nh·D] (whole projection)
    k_norm: Param | None = None


@dataclass(frozen=True)
class MLPWeights:
    """SwiGLU MLP (spec §4.1): down(silu(gate x) ⊙ up x)."""

    gate: Param  # [F, H]
    up: Param  # [F, H]
    down: Param  # [H, F]


@dataclass(frozen=True)
class MoEWeights:
    """MoE block (spec §4.2)."""

    router: Param  # [E, H]
    experts: tuple[MLPWeights, ...]
    selection_bias: Param | None = None  # [E]
    shared: MLPWeights | None = None
    shared_gate: Param | None = None  # [1, H]


@dataclass(frozen=True)
class LayerWeights:
    attention: AttentionWeights | None
    ffn_norm: Param  # post_attention_layernorm [H]
    ffn: MLPWeights | MoEWeights


@dataclass(frozen=True)
class ModelWeights:
    embed: Param  # [V, H]
    layers: tuple[LayerWeights, ...]
    norm: Param  # [H]
    lm_head: Param  # [V, H]; the embedding itself when tied


@dataclass(frozen=True)
class Model:
    """A loaded model: config, lazy weights, and the open checkpoint they map (None in memory)."""

    config: ModelConfig
    weights: ModelWeights
    checkpoint: Checkpoint | gguf_io.GGUFFile | None = None

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()


# ---------------------------------------------------------------------------------------------
# Binding checkpoint names to the container


class _Binder:
    """Takes tensors out of a name -> (storage, shape, raw) source, checking shape and dtype,
    and remembers what was taken so leftovers can be reported."""

    def __init__(self, names: list[str], storage: Callable[[str], str], shape: Callable[[str], tuple],
                 raw: Callable[[str], np.ndarray], where: str,
                 decode: Callable[[str], Callable | None] = lambda name: None):
        self.available = set(names)
        self.storage, self.shape, self.raw_of, self.where, self.decode = storage, shape, raw, where, decode
        self.taken: set[str] = set()

    def _check(self, name: str, expected: tuple[int, ...]) -> str:
        dt = self.storage(name)
        if dt not in FLOAT_STORAGE and self.decode(name) is None:
            raise WeightsError(f"{self.where}: tensor '{name}' has dtype {dt}; expected one of "
                               f"{', '.join(FLOAT_STORAGE)}")
        found = tuple(self.shape(name))
        if found != tuple(expected):
            raise WeightsError(f"{self.where}: tensor '{name}' has shape {list(found)}; "
                               f"the config implies {list(expected)}")
        return dt

    def first(self, candidates: tuple[str, ...]) -> str | None:
        hits = [c for c in candidates if c in self.available]
        if len(hits) > 1:
            raise WeightsError(f"{self.where}: both '{hits[0]}' and '{hits[1]}' are present; they name "
                               "the same weight, keep one")
        return hits[0] if hits else None

    def get(self, candidates: str | tuple[str, ...], shape: tuple[int, ...]) -> Param:
        candidates = (candidates,) if isinstance(candidates, str) else candidates
        name = self.first(candidates)
        if name is None:
            quantized = self._quantized(candidates, shape)
            if quantized is not None:
                return quantized
            raise WeightsError(f"{self.where}: missing tensor '{candidates[0]}' (shape {list(shape)})"
                               + (f"; also looked for {', '.join(candidates[1:])}" if len(candidates) > 1 else ""))
        dt = self._check(name, shape)
        self.taken.add(name)
        raw = self.raw_of
        return Param(name, dt, tuple(shape), lambda: raw(name), _decode=self.decode(name))

    def _quantized(self, candidates: tuple[str, ...], shape: tuple[int, ...]) -> Param | None:
        """A weight stored quantised (spec/quant.md §4): 'X.weight.q8' + 'X.weight.q8.scale', or
        'X.weight.q4g{G}' + '.scale', checked for dtype and shape."""
        hits = [(c, st) for c in candidates for st in quant.STORAGE if quant.part_names(c, st)[0] in self.available]
        if not hits:
            return None
        if len(hits) > 1:
            a, b = (quant.part_names(c, st)[0] for c, st in hits[:2])
            raise WeightsError(f"{self.where}: both '{a}' and '{b}' are present; they name the same weight, keep one")
        name, storage = hits[0]
        if len(shape) != 2:
            raise WeightsError(f"{self.where}: '{quant.part_names(name, storage)[0]}' quantises '{name}', "
                               f"a {len(shape)}-D tensor; only matrices are quantised")
        for tensor, (dt, want) in zip(quant.part_names(name, storage), quant.part_specs(storage, tuple(shape))):
            if tensor not in self.available:
                raise WeightsError(f"{self.where}: missing tensor '{tensor}' ({dt} {list(want)}), the other half "
                                   f"of the {storage} weight '{name}'")
            found_dt, found = self.storage(tensor), tuple(self.shape(tensor))
            if found_dt != dt or found != want:
                raise WeightsError(f"{self.where}: tensor '{tensor}' is {found_dt} {list(found)}; a {storage} "
                                   f"weight of shape {list(shape)} needs {dt} {list(want)} (spec/quant.md)")
            self.taken.add(tensor)
        q_name, s_name = quant.part_names(name, storage)
        raw = self.raw_of
        return Param(name, storage, tuple(shape), lambda: raw(q_name), lambda: raw(s_name))

    def maybe(self, candidates: str | tuple[str, ...], shape: tuple[int, ...], wanted: bool) -> Param | None:
        """Present iff `wanted`; a tensor the config does not call for is an error, not ignored."""
        candidates = (candidates,) if isinstance(candidates, str) else candidates
        if wanted:
            return self.get(candidates, shape)
        name = self.first(candidates)
        if name is not None:
            raise WeightsError(f"{self.where}: unexpected tensor '{name}': the config does not call for it")
        return None

    def slab(self, name: str, shape: tuple[int, ...]) -> str:
        """A fused 3-D expert tensor, checked whole; its experts are bound with `part`."""
        self._check(name, shape)
        self.taken.add(name)
        return name

    def part(self, name: str, e: int, lo: int, hi: int) -> Param:
        """Rows lo:hi of expert e of a fused [E, R, C] tensor, as a zero-copy view."""
        raw, shape = self.raw_of, self.shape(name)
        return Param(f"{name}[{e}, {lo}:{hi}]", self.storage(name), (hi - lo, shape[2]),
                     lambda: raw(name)[e, lo:hi])

    def leftovers(self) -> list[str]:
        return sorted(n for n in self.available - self.taken if not n.endswith("rotary_emb.inv_freq"))


def _attention(b: _Binder, cfg: ModelConfig, p: str) -> AttentionWeights:
    H, D, Nh, Nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    qn = {"none": None, "head": (D,), "proj": (Nh * D,)}[cfg.qk_norm]
    kn = {"none": None, "head": (D,), "proj": (Nkv * D,)}[cfg.qk_norm]
    a = f"{p}self_attn."
    return AttentionWeights(
        norm=b.get(f"{p}input_layernorm.weight", (H,)),
        q=b.get(f"{a}q_proj.weight", (Nh * D, H)),
        k=b.get(f"{a}k_proj.weight", (Nkv * D, H)),
        v=b.get(f"{a}v_proj.weight", (Nkv * D, H)),
        o=b.get(f"{a}o_proj.weight", (H, Nh * D)),
        q_bias=b.maybe(f"{a}q_proj.bias", (Nh * D,), cfg.qkv_bias),
        k_bias=b.maybe(f"{a}k_proj.bias", (Nkv * D,), cfg.qkv_bias),
        v_bias=b.maybe(f"{a}v_proj.bias", (Nkv * D,), cfg.qkv_bias),
        o_bias=b.maybe(f"{a}o_proj.bias", (H,), cfg.o_bias),
        q_norm=b.maybe(f"{a}q_norm.weight", qn or (0,), qn is not None),
        k_norm=b.maybe(f"{a}k_norm.weight", kn or (0,), kn is not None),
    )


def _mlp(b: _Binder, p: str, H: int, F: int) -> MLPWeights:
    return MLPWeights(gate=b.get(f"{p}gate_proj.weight", (F, H)), up=b.get(f"{p}up_proj.weight", (F, H)),
                      down=b.get(f"{p}down_proj.weight", (H, F)))


def _experts(b: _Binder, cfg: ModelConfig, prefixes: tuple[str, ...], spec: MoESpec) -> tuple[MLPWeights, ...]:
    """Per-expert tensors, or the fused 3-D form transformers 5 holds in memory:
    experts.gate_up_proj [E, 2F, H] (gate rows first), experts.down_proj [E, H, F]."""
    H, E, F = cfg.hidden_size, spec.num_experts, spec.intermediate_size
    fused = b.first(tuple(f"{p}experts.gate_up_proj{s}" for p in prefixes for s in ("", ".weight")))
    if fused is not None:
        gu = b.slab(fused, (E, 2 * F, H))
        down_name = b.first(tuple(f"{p}experts.down_proj{s}" for p in prefixes for s in ("", ".weight")))
        if down_name is None:
            raise WeightsError(f"{b.where}: '{fused}' is present but '{prefixes[0]}experts.down_proj' is missing")
        dn = b.slab(down_name, (E, H, F))
        return tuple(MLPWeights(gate=b.part(gu, e, 0, F), up=b.part(gu, e, F, 2 * F), down=b.part(dn, e, 0, H))
                     for e in range(E))
    experts = []
    for e in range(E):
        alts = [(f"{p}experts.{e}.gate_proj.weight", f"{p}experts.{e}.up_proj.weight",
                 f"{p}experts.{e}.down_proj.weight") for p in prefixes]
        # Mixtral's own names: w1 = gate, w3 = up, w2 = down
        alts += [(f"{p}experts.{e}.w1.weight", f"{p}experts.{e}.w3.weight", f"{p}experts.{e}.w2.weight")
                 for p in prefixes]
        experts.append(MLPWeights(gate=b.get(tuple(a[0] for a in alts), (F, H)),
                                  up=b.get(tuple(a[1] for a in alts), (F, H)),
                                  down=b.get(tuple(a[2] for a in alts), (H, F))))
    return tuple(experts)


def _moe(b: _Binder, cfg: ModelConfig, p: str, spec: MoESpec) -> MoEWeights:
    H, E = cfg.hidden_size, spec.num_experts
    prefixes = (f"{p}mlp.", f"{p}block_sparse_moe.") if cfg.moe_naming == "mixtral" else (f"{p}mlp.",)
    S = spec.shared_expert_intermediate_size
    return MoEWeights(
        router=b.get(tuple(f"{q}gate.weight" for q in prefixes), (E, H)),
        experts=_experts(b, cfg, prefixes, spec),
        selection_bias=b.maybe(f"{p}mlp.gate.e_score_correction_bias", (E,), spec.selection_bias),
        shared=_mlp(b, f"{p}mlp.shared_expert.", H, S) if S else None,
        shared_gate=b.maybe(f"{p}mlp.shared_expert_gate.weight", (1, H), spec.shared_expert_gate),
    )


def _layer(b: _Binder, cfg: ModelConfig, i: int, spec: LayerSpec) -> LayerWeights:
    p = f"model.layers.{i}."
    if spec.attention:
        attention = _attention(b, cfg, p)
    else:
        stray = sorted(n for n in b.available if n.startswith(f"{p}self_attn.") or n == f"{p}input_layernorm.weight")
        if stray:
            raise WeightsError(f"{b.where}: layer {i} has no attention in the layer plan, but the checkpoint "
                               f"holds '{stray[0]}'" + (f" and {len(stray) - 1} more" if len(stray) > 1 else ""))
        attention = None
    ffn_norm = b.get(f"{p}post_attention_layernorm.weight", (cfg.hidden_size,))
    if spec.moe is None:
        ffn = _mlp(b, f"{p}mlp.", cfg.hidden_size, spec.intermediate_size)
    else:
        ffn = _moe(b, cfg, p, spec.moe)
    return LayerWeights(attention=attention, ffn_norm=ffn_norm, ffn=ffn)


def bind_weights(cfg: ModelConfig, names: list[str], storage: Callable[[str], str],
                 shape: Callable[[str], tuple], raw: Callable[[str], np.ndarray], where: str,
                 decode: Callable[[str], Callable | None] = lambda name: None) -> ModelWeights:
    """Bind every tensor the config calls for; missing, misshapen or extra tensors are errors.
    `decode(name)`: the decoder of a tensor in a GGUF block type, else None (Param._decode)."""
    return _bind(_Binder(names, storage, shape, raw, where, decode), cfg)


class _Recorder(_Binder):
    """A binder over a checkpoint that has everything: records the canonical name and shape asked for."""

    def __init__(self):
        super().__init__([], lambda n: "F32", lambda n: (), lambda n: np.zeros(0), "expected tensors")
        self.asked: list[tuple[str, tuple[int, ...]]] = []

    def first(self, candidates):
        return None  # canonical form: per-expert tensors, optional tensors only when wanted

    def get(self, candidates, shape):
        name = candidates if isinstance(candidates, str) else candidates[0]
        self.asked.append((name, tuple(shape)))
        return Param(name, "F32", tuple(shape), lambda: np.zeros(0))


def expected_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of `cfg` holds, in the canonical naming we write
    (per-expert MoE tensors, no lm_head when tied).  Derived from the binder: one source of truth."""
    r = _Recorder()
    _bind(r, cfg)
    return r.asked


def _bind(b: _Binder, cfg: ModelConfig) -> ModelWeights:
    where = b.where
    V, H = cfg.vocab_size, cfg.hidden_size
    embed = b.get("model.embed_tokens.weight", (V, H))
    layers = tuple(_layer(b, cfg, i, spec) for i, spec in enumerate(cfg.layers))
    norm = b.get("model.norm.weight", (H,))
    if cfg.tie_word_embeddings:
        lm_head = embed
        if "lm_head.weight" in b.available:
            # Some exporters write the tied matrix twice; accept it only if it really is the same.
            other = b.get("lm_head.weight", (V, H))
            if other.storage != embed.storage or not np.array_equal(other.raw(), embed.raw()):
                raise WeightsError(f"{where}: tie_word_embeddings=true but 'lm_head.weight' differs from "
                                   "'model.embed_tokens.weight'")
    else:
        lm_head = b.get("lm_head.weight", (V, H))
    extra = b.leftovers()
    if extra:
        raise WeightsError(f"{where}: unexpected tensor(s) the config does not call for: "
                           f"{', '.join(extra[:5])}" + (f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""))
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def weights_from_arrays(cfg: ModelConfig, arrays: dict[str, np.ndarray],
                        storage: dict[str, str] | None = None) -> ModelWeights:
    """Bind in-memory arrays by checkpoint name (BF16 tensors as uint16 bits, named in `storage`)."""
    storage = storage or {}
    params = {n: Param.of(n, a, storage.get(n)) for n, a in arrays.items()}
    return bind_weights(cfg, list(params), lambda n: params[n].storage, lambda n: params[n].shape,
                        lambda n: params[n].raw(), "in-memory weights")


# ---------------------------------------------------------------------------------------------
# Loading a model from disk

METADATA_CONFIG_KEY = "config"  # safetensors __metadata__ key holding the config JSON (spec/format.md §1)


def _find_config(ckpt: Checkpoint, weights_path: Path, config: str | Path | None, strict: bool) -> ModelConfig:
    """--config wins; else the config JSON in the file's metadata and/or config.json beside it
    (both present and different is an error: we will not pick one silently)."""
    if config is not None:
        return load_config(config, strict=strict)
    found: list[tuple[str, ModelConfig]] = []
    text = ckpt.metadata.get(METADATA_CONFIG_KEY)
    if text is not None:
        where = f"{weights_path} __metadata__['{METADATA_CONFIG_KEY}']"
        found.append((f"{weights_path} __metadata__",
                      parse_config(parse_json(text, where), where=where, strict=strict)))
    folder = weights_path if weights_path.is_dir() else weights_path.parent
    if (folder / "config.json").is_file():
        found.append((str(folder / "config.json"), load_config(folder / "config.json", strict=strict)))
    if not found:
        raise ConfigError(f"{weights_path}: no config: give --config, put config.json beside the weights, "
                          f"or store it in the safetensors __metadata__ under '{METADATA_CONFIG_KEY}'")
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise ConfigError(f"{found[0][0]} and {found[1][0]} describe different models; "
                          "pass --config to choose one")
    return found[0][1]


def load_model(weights: str | Path, config: str | Path | None = None, *, strict_config: bool = False) -> Model:
    """Open a checkpoint (safetensors file, index json or directory, or a GGUF file) and bind its
    tensors to the config.  `strict_config`: refuse config keys d2m_ref does not know
    (spec/config.md, "Key policy")."""
    path = Path(weights)
    if gguf_io.is_gguf(path):
        return _load_gguf(path, config, strict_config)
    ckpt = Checkpoint.open(path)
    try:
        quant.check_metadata(ckpt.metadata, str(path))
        cfg = _find_config(ckpt, path, config, strict_config)
        w = bind_weights(cfg, ckpt.names(), ckpt.dtype, ckpt.shape, ckpt.raw, str(path))
    except BaseException:
        ckpt.close()
        raise
    return Model(cfg, w, ckpt)


def _load_gguf(path: Path, config: str | Path | None, strict: bool) -> Model:
    """A GGUF file (spec/format.md §3): the config from its metadata (or --config), the tensors
    under Hugging Face names, decoded row block by row block when an op asks."""
    f = gguf_io.GGUFFile(path)
    try:
        described = gguf_io.gguf_config(f)
        where = f"{path} (GGUF metadata)"
        cfg = load_config(config, strict=strict) if config is not None else parse_config(described, where, strict=strict)
        tensors = gguf_io.hf_tensors(f, described)
        w = bind_weights(cfg, list(tensors), lambda n: tensors[n].storage, lambda n: tensors[n].shape,
                         lambda n: tensors[n].raw(), str(path), lambda n: tensors[n].decode)
    except BaseException:
        f.close()
        raise
    return Model(cfg, w, f)


def map_params(w, fn: Callable[[Param], Param]):
    """A copy of a weights tree with every Param replaced by fn(Param).  A Param that appears twice
    (the tied LM head) is mapped once and stays shared."""
    memo: dict[int, Param] = {}

    def walk(obj):
        if isinstance(obj, Param):
            if id(obj) not in memo:
                memo[id(obj)] = fn(obj)
            return memo[id(obj)]
        if isinstance(obj, tuple):
            return tuple(walk(o) for o in obj)
        if obj is not None and hasattr(obj, "__dataclass_fields__"):
            return type(obj)(**{f: walk(getattr(obj, f)) for f in obj.__dataclass_fields__})
        return obj

    return walk(w)


def canonical_params(model: "Model") -> list[tuple[str, Param]]:
    """(canonical checkpoint name, Param) for every tensor of the model, in the naming d2m_ref
    writes (spec/format.md §1: per-expert MoE tensors, no lm_head when tied), whatever layout the
    model was loaded from."""
    canonical = _bind(_Recorder(), model.config)  # the same structure, Params named canonically
    seen: dict[str, Param] = {}

    def walk(real, named):
        if isinstance(real, Param):
            yield named.name, real
        elif isinstance(real, tuple):
            for r, n in zip(real, named):
                yield from walk(r, n)
        elif real is not None and hasattr(real, "__dataclass_fields__"):
            for f in real.__dataclass_fields__:
                yield from walk(getattr(real, f), getattr(named, f))

    for name, p in walk(model.weights, canonical):
        seen.setdefault(name, p)  # a tied LM head is the embedding: written once
    return list(seen.items())


def iter_params(w: ModelWeights) -> Iterator[Param]:
    """Every distinct Param of the model once (the tied LM head is not counted twice)."""
    found: list[Param] = []
    map_params(w, lambda p: found.append(p) or p)
    return iter(found)
