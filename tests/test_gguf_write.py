"""The test-side GGUF writer (tests/peer/gguf_write.py) against transformers' own GGUF import.

What transformers' loader agreeing shows: the writer's architecture names, metadata keys, tensor
names, llama q/k permutation, expert stacking and tied-embedding convention are the ones
transformers (which follows llama.cpp) reads.  Metric: relative error = max |a - b| / max |b| over
the [T, V] logits (hf.relative_error).

Tolerances:
- F32 files: 1e-5.  Same float32 weights, same transformers code; the one difference is that GGUF
  stores rms_norm_eps as float32 (1e-5 comes back as 9.9999997e-06).  Measured: 0.0 on all seven cases.
- Quantised files, transformers vs the source model with each weight replaced by the value its
  block dequantises to (gguf-py): 1e-5 (measured 0.0): the file says exactly what the writer meant.
- Quantised files vs the unquantised source: 3 x WEIGHT_TOL of the type.  WEIGHT_TOL is about
  1.5x the relative RMS weight error measured on N(0, 1) rows of 256 (F16 2.1e-4, BF16 1.7e-3,
  Q8_0 5.3e-3, Q6_K 1.9e-2, Q5_K 3.8e-2, Q4_K 7.8e-2, Q4_1 7.8e-2, Q4_0 8.6e-2); with weights of
  std 1/sqrt(fan_in) that error grows on its way to the logits: measured drift 2.2x to 3.1x the
  weight error over two layers (worst: Q4_0 on the qwen2_moe case, 0.23).

transformers 5.24 reads these five through its legacy GGUF path (modeling_gguf_pytorch_utils),
which maps only some keys; where the file has a key transformers does not read, the test passes the
value to from_pretrained and says why (`transformers_overrides`).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers refuses a GGUF file without it

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

try:  # tests/ is a package (tests/__init__.py) ...
    from tests.peer import gguf_write as gw
    from tests.peer import hf
except ImportError:  # ... or a plain directory that pytest put on sys.path
    from peer import gguf_write as gw
    from peer import hf

F32_TOL = 1e-5
INPUT_IDS = np.array([1, 5, 9, 3, 7, 2, 11, 4, 30, 17, 8, 60], dtype=np.int64)

# Configs both llama.cpp and transformers' GGUF loader can represent (hf.FAMILIES has cases neither
# can: dense layers inside qwen2_moe, norm_topk_prob on qwen2_moe, head_dim != hidden/heads on qwen2).
CASES = [
    hf.HFCase("gguf_llama_tied_gqa7_headdim10", dict(
        model_type="llama", vocab_size=97, hidden_size=56, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=7, num_key_value_heads=1, head_dim=10, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=500.0))),
    hf.HFCase("gguf_qwen2_gqa3", dict(
        model_type="qwen2", vocab_size=203, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=1_000_000.0, tie_word_embeddings=False)),
    hf.HFCase("gguf_qwen3_gqa2_headdim16", dict(
        model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), tie_word_embeddings=False)),
    hf.HFCase("gguf_qwen2_moe_shared_gqa3", dict(
        model_type="qwen2_moe", vocab_size=131, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False, tie_word_embeddings=False)),
    hf.HFCase("gguf_qwen3_moe_tied_gqa2_headdim12", dict(
        model_type="qwen3_moe", vocab_size=203, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
        mlp_only_layers=[], tie_word_embeddings=True)),
    # transformers' GGUF loader reads neither rope scaling nor attention_bias for llama: these two
    # only test names and the permutation of q/k biases (values passed by transformers_overrides).
    hf.case("llama_llama3rope_tied_gqa7"),
    hf.case("llama_linearrope_bias_gqa2"),
]
CASE_IDS = [c.name for c in CASES]


def transformers_overrides(hf_case: hf.HFCase) -> dict:
    """from_pretrained kwargs for file contents transformers 5.24's GGUF mapping does not read."""
    config = hf_case.config
    overrides = {}
    if config["model_type"] == "qwen3":
        overrides["head_dim"] = config["head_dim"]  # qwen3 maps no attention.key_length: default 128
    if config["model_type"] in ("qwen2_moe", "qwen3_moe"):
        overrides["moe_intermediate_size"] = config["moe_intermediate_size"]  # expert_feed_forward_length unread
        overrides["experts_implementation"] = "eager"
    if config["model_type"] == "qwen2_moe":
        overrides["shared_expert_intermediate_size"] = config["shared_expert_intermediate_size"]
    if config["model_type"] == "llama":
        overrides["rope_parameters"] = config["rope_parameters"]  # rope_freqs / rope.scaling.* unread
        overrides["attention_bias"] = config.get("attention_bias", False)
    return overrides


def load_with_transformers(path, hf_case: hf.HFCase):
    """transformers' own GGUF import of `path`, float32, eager attention."""
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
        **transformers_overrides(hf_case)).eval()


# ---------------------------------------------------------------------------------------------
# F32: transformers reads back the source model


@pytest.mark.parametrize("hf_case", CASES, ids=CASE_IDS)
def test_f32_file_loads_in_transformers_with_the_same_logits(hf_case, tmp_path):
    """An F32 GGUF loaded by transformers gives the source model's logits (1e-5 relative)."""
    model = hf.build(hf_case, torch.float32)
    path = gw.write_gguf(model, tmp_path / "model.gguf")
    loaded = load_with_transformers(path, hf_case)
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert loaded.config.num_key_value_heads == model.config.num_key_value_heads
    assert loaded.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps, rel=1e-7)
    assert loaded.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    error = hf.relative_error(hf.logits(loaded, INPUT_IDS), hf.logits(model, INPUT_IDS))
    assert error <= F32_TOL, f"{hf_case.name}: relative logits error {error:.3g} > {F32_TOL}"


# ---------------------------------------------------------------------------------------------
# Metadata and tensor names


def read_metadata(path) -> dict:
    """{key: python value} of every metadata field (arrays as lists)."""
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


EXPECTED_KEYS = {  # beyond general.* and tokenizer.*
    "llama": {"block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "rope.freq_base",
              "attention.layer_norm_rms_epsilon", "attention.key_length", "attention.value_length",
              "vocab_size", "rope.dimension_count"},
    "qwen2": {"block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "rope.freq_base",
              "attention.layer_norm_rms_epsilon"},
    "qwen3": {"block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "rope.freq_base",
              "attention.layer_norm_rms_epsilon", "attention.key_length", "attention.value_length"},
    "qwen2moe": {"block_count", "context_length", "embedding_length", "feed_forward_length",
                 "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                 "attention.layer_norm_rms_epsilon", "expert_count", "expert_used_count",
                 "expert_feed_forward_length", "expert_shared_feed_forward_length"},
    "qwen3moe": {"block_count", "context_length", "embedding_length", "feed_forward_length",
                 "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                 "attention.layer_norm_rms_epsilon", "attention.key_length", "attention.value_length",
                 "expert_count", "expert_used_count", "expert_feed_forward_length"},
}
GENERAL_KEYS = {"general.architecture", "general.type", "general.name", "general.file_type",
                "general.quantization_version", "general.alignment"}
TOKENIZER_KEYS = {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                  "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"}


@pytest.mark.parametrize("hf_case", CASES[:5], ids=CASE_IDS[:5])
def test_metadata_keys_and_values_per_arch(hf_case, tmp_path):
    """Each architecture carries exactly convert_hf_to_gguf's keys, with the config's values."""
    model = hf.build(hf_case, torch.float32)
    meta = read_metadata(gw.write_gguf(model, tmp_path / "m.gguf"))
    arch = meta["general.architecture"]
    assert arch == gw.ARCH[hf_case.config["model_type"]]
    written = {k for k in meta if not k.startswith(("general.", "tokenizer."))}
    assert written == {f"{arch}.{k}" for k in EXPECTED_KEYS[arch]}
    assert {k for k in meta if k.startswith("general.")} <= GENERAL_KEYS
    assert {k for k in meta if k.startswith("tokenizer.")} == TOKENIZER_KEYS
    cfg = model.config
    assert meta[f"{arch}.block_count"] == cfg.num_hidden_layers
    assert meta[f"{arch}.embedding_length"] == cfg.hidden_size
    assert meta[f"{arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert meta[f"{arch}.rope.freq_base"] == np.float32(cfg.rope_parameters["rope_theta"])
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == np.float32(cfg.rms_norm_eps)
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size
    if arch == "llama":
        assert meta["llama.rope.dimension_count"] == cfg.head_dim
    if arch.endswith("moe"):
        assert meta[f"{arch}.expert_count"] == cfg.num_experts
        assert meta[f"{arch}.expert_feed_forward_length"] == cfg.moe_intermediate_size


def test_rope_scaling_keys():
    """linear RoPE writes rope.scaling.type/factor; YaRN adds the original context; llama3 writes none."""
    def keys(hf_case):
        return {key: value for key, value, _ in gw.metadata(hf.make_config(hf_case))}

    linear = keys(hf.case("llama_linearrope_bias_gqa2"))
    assert linear["llama.rope.scaling.type"] == "linear" and linear["llama.rope.scaling.factor"] == 2.0
    assert not any(".rope.scaling." in key for key in keys(hf.case("llama_llama3rope_tied_gqa7")))
    yarn = keys(hf.HFCase("yarn", dict(CASES[1].config, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32))))
    assert yarn["qwen2.rope.scaling.type"] == "yarn" and yarn["qwen2.rope.scaling.factor"] == 4.0
    assert yarn["qwen2.rope.scaling.original_context_length"] == 32


def expected_tensor_names(config) -> set[str]:
    arch = gw.ARCH[config.model_type]
    names = {"token_embd.weight", "output_norm.weight"} | (set() if config.tie_word_embeddings else {"output.weight"})
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"]
    per_layer += ["attn_q_norm", "attn_k_norm"] if arch in ("qwen3", "qwen3moe") else []
    per_layer += (["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] if arch.endswith("moe")
                  else ["ffn_gate", "ffn_up", "ffn_down"])
    if arch == "qwen2moe":
        per_layer += ["ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
    biases = ["attn_q", "attn_k", "attn_v"] if arch in ("qwen2", "qwen2moe") else []
    if arch == "llama" and getattr(config, "attention_bias", False):
        biases = ["attn_q", "attn_k", "attn_v", "attn_output"]
    for i in range(config.num_hidden_layers):
        names |= {f"blk.{i}.{n}.weight" for n in per_layer} | {f"blk.{i}.{n}.bias" for n in biases}
    if arch == "llama" and config.rope_parameters["rope_type"] == "llama3":
        names.add("rope_freqs.weight")
    return names


@pytest.mark.parametrize("hf_case", CASES, ids=CASE_IDS)
def test_tensor_names_and_shapes(hf_case, tmp_path):
    """The file holds exactly llama.cpp's tensor names, with ggml's reversed shapes (ne = {in, out, E})."""
    model = hf.build(hf_case, torch.float32)
    reader = gguf.GGUFReader(str(gw.write_gguf(model, tmp_path / "m.gguf")))
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    cfg = model.config
    assert set(shapes) == expected_tensor_names(cfg)
    H, D = cfg.hidden_size, gw._head_dim(cfg)
    assert shapes["token_embd.weight"] == (H, cfg.vocab_size)
    assert shapes["blk.0.attn_q.weight"] == (H, cfg.num_attention_heads * D)
    assert shapes["blk.0.attn_k.weight"] == (H, cfg.num_key_value_heads * D)
    if cfg.model_type.endswith("moe"):
        E, F = cfg.num_experts, cfg.moe_intermediate_size
        assert shapes["blk.1.ffn_gate_inp.weight"] == (H, E)
        assert shapes["blk.1.ffn_gate_exps.weight"] == (H, F, E)
        assert shapes["blk.1.ffn_up_exps.weight"] == (H, F, E)
        assert shapes["blk.1.ffn_down_exps.weight"] == (F, H, E)
    if cfg.model_type == "qwen2_moe":
        assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (H,)  # 1-D, as llama.cpp declares it


@pytest.mark.parametrize("hf_case", CASES[:5], ids=CASE_IDS[:5])
def test_tensor_names_agree_with_gguf_py_name_map(hf_case):
    """Our HF -> GGUF name table agrees with gguf-py's own TensorNameMap (an independent table)."""
    model = hf.build(hf_case, torch.float32)
    arch = gw.ARCH[model.config.model_type]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    written = {name for name, _ in gw.gguf_tensors(model)}
    for hf_name in model.state_dict():
        if hf_name.endswith("experts.gate_up_proj"):
            continue  # fused in transformers 5; its halves are checked below
        base, suffix = hf_name.rsplit(".", 1) if hf_name.endswith((".weight", ".bias")) else (hf_name, "weight")
        expected = name_map.get_name(base)
        assert expected is not None, f"gguf-py has no name for {hf_name}"
        tied_head = hf_name == "lm_head.weight" and model.config.tie_word_embeddings
        assert f"{expected}.{suffix}" in written or tied_head, f"{hf_name}: expected {expected}.{suffix}"
    if arch.endswith("moe"):
        assert name_map.get_name("model.layers.1.mlp.experts.gate_proj") == "blk.1.ffn_gate_exps"
        assert name_map.get_name("model.layers.1.mlp.experts.up_proj") == "blk.1.ffn_up_exps"


def test_expert_stacks_split_transformers_fused_gate_up():
    """ffn_gate_exps / ffn_up_exps are the first / second half of transformers' gate_up_proj rows."""
    model = hf.build(CASES[3], torch.float32)
    tensors = dict(gw.gguf_tensors(model))
    fused = model.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    F = model.config.moe_intermediate_size
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate_exps.weight"], fused[:, :F])
    np.testing.assert_array_equal(tensors["blk.1.ffn_up_exps.weight"], fused[:, F:])


# ---------------------------------------------------------------------------------------------
# The llama q/k permutation and llama3 RoPE factors


def test_permutation_interleaves_the_two_halves_of_each_head():
    """permute: row h*D + 2i + j <- h*D + j*D/2 + i; unpermute inverts it; so does transformers'."""
    rows = np.arange(12.0)[:, None]  # 2 heads of D = 6
    np.testing.assert_array_equal(gw.permute(rows, 2)[:, 0], [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11])
    w = np.random.default_rng(0).standard_normal((7 * 10, 5))
    np.testing.assert_array_equal(gw.unpermute(gw.permute(w, 7), 7), w)
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    undone = LlamaTensorProcessor(config={})._reverse_permute_weights(gw.permute(w, 7), 7, 7)
    np.testing.assert_array_equal(undone, w)


def test_qwen_files_are_not_permuted():
    """qwen2/qwen3 attn_q is transformers' q_proj unchanged (llama.cpp runs them with NEOX RoPE)."""
    model = hf.build(CASES[2], torch.float32)
    np.testing.assert_array_equal(dict(gw.gguf_tensors(model))["blk.0.attn_q.weight"],
                                  model.model.layers[0].self_attn.q_proj.weight.detach().numpy())


def test_llama3_rope_freqs_divide_the_base_frequencies_as_transformers_does():
    """rope_freqs.weight = default inv_freq / transformers' llama3 inv_freq (llama.cpp divides by it)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = hf.make_config(hf.case("llama_llama3rope_tied_gqa7"))
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    D, theta = config.head_dim, config.rope_parameters["rope_theta"]
    base = 1.0 / theta ** (np.arange(0, D, 2) / D)
    factors = gw.llama3_rope_factors(config)
    assert factors.dtype == np.float32 and factors.shape == (D // 2,)
    np.testing.assert_allclose(base / factors, llama3.double().numpy(), rtol=1e-6)
    assert len(set(np.round(factors, 4))) >= 3  # high (1), medium (smoothed) and low (factor) bands


# ---------------------------------------------------------------------------------------------
# Quantised storage

QUANT_TYPES = [t for t in gw.TENSOR_TYPES if t != "F32"]
WEIGHT_TOL = {"F16": 3e-4, "BF16": 2.5e-3, "Q8_0": 8e-3, "Q6_K": 3e-2, "Q5_K": 6e-2,
              "Q4_K": 0.12, "Q4_1": 0.12, "Q4_0": 0.13}
QUANT_LOGIT_TOL = {qtype: 3 * tol for qtype, tol in WEIGHT_TOL.items()}


def dequantised(x: np.ndarray, qtype: str) -> np.ndarray:
    """x stored as `qtype` and read back by gguf-py (llama.cpp's reference dequantisers)."""
    data = gw.quantize_k(x, qtype) if qtype in ("Q4_K", "Q5_K", "Q6_K") else gguf.quants.quantize(
        x.astype(np.float32), gguf.GGMLQuantizationType[qtype])
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(x.shape)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_read_the_same_by_three_dequantisers(qtype):
    """Our K-quant blocks mean the same numbers to gguf-py, transformers' torch dequantiser and ours."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0, :40] = 0.0        # an all-zero sub-block
    x[1, :256] = 3.0       # a constant block
    x[2] *= 1e3            # large values (f16 scales stay finite)
    x[3, 256:] = -np.abs(x[3, 256:])  # an all-negative block
    data = gw.quantize_k(x, qtype)
    assert data.shape == (6, 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    by_gguf = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    by_torch = torch_dequantize(torch.from_numpy(data.reshape(-1).copy()),
                                int(gguf.GGMLQuantizationType[qtype])).numpy().reshape(x.shape)
    np.testing.assert_array_equal(by_gguf, by_torch)
    np.testing.assert_array_equal(by_gguf, gw.dequantize_k(data, qtype).reshape(x.shape))
    assert np.all(np.isfinite(by_gguf))
    np.testing.assert_array_equal(by_gguf[0, :32], 0.0)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_weight_error_per_type(qtype):
    """Relative RMS weight error of each storage type on N(0, 1) rows (pinned in WEIGHT_TOL)."""
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    error = np.sqrt(np.mean((dequantised(x, qtype) - x) ** 2) / np.mean(x ** 2))
    assert error <= WEIGHT_TOL[qtype], f"{qtype}: relative RMS weight error {error:.3g}"
    assert error > WEIGHT_TOL[qtype] / 10, f"{qtype}: error {error:.3g} too small: is it really stored as {qtype}?"


QUANT_CASES = [  # every row length a multiple of 256, so each type is used as asked
    hf.HFCase("quant_llama_gqa2", dict(
        model_type="llama", vocab_size=97, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=False)),
    hf.HFCase("quant_qwen2_moe", dict(
        model_type="qwen2_moe", vocab_size=131, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256,
        norm_topk_prob=False, tie_word_embeddings=False)),
    hf.HFCase("quant_qwen3_moe_tied", dict(
        model_type="qwen3_moe", vocab_size=97, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True, tie_word_embeddings=True)),
]


def stays_f32(hf_name: str, shape) -> bool:
    """llama.cpp's rule, stated for transformers' names: 1-D tensors and the routers stay F32."""
    return len(shape) <= 1 or hf_name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))


def intended_model(model, qtype: str):
    """`model` with every weight replaced by the value its GGUF blocks dequantise to.  Row-wise
    storage commutes with the llama row permutation and with stacking experts, so this can be done
    on transformers' own tensors."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if not stays_f32(name, param.shape):
                param.copy_(torch.from_numpy(dequantised(param.detach().numpy(), qtype)))
    return reference


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@pytest.mark.parametrize("hf_case", QUANT_CASES, ids=[c.name for c in QUANT_CASES])
def test_quantised_file_round_trips_through_transformers(hf_case, qtype, tmp_path):
    """transformers reads a quantised file as exactly the dequantised weights, and the logits move
    from the float model's by no more than that storage type's error."""
    model = hf.build(hf_case, torch.float32)
    path = gw.write_gguf(model, tmp_path / "m.gguf", tensor_type=qtype)
    types = gw.tensor_types(path)
    for name, stored in types.items():
        f32 = name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"))
        assert stored == ("F32" if f32 else qtype), f"{name} stored as {stored}"
    assert read_metadata(path)["general.file_type"] == int(gw._FILE_TYPE[qtype])
    loaded = load_with_transformers(path, hf_case)
    got = hf.logits(loaded, INPUT_IDS)
    exact = hf.relative_error(got, hf.logits(intended_model(model, qtype), INPUT_IDS))
    assert exact <= F32_TOL, f"{qtype}: transformers vs dequantised weights {exact:.3g}"
    drift = hf.relative_error(got, hf.logits(model, INPUT_IDS))
    assert drift <= QUANT_LOGIT_TOL[qtype], f"{qtype}: logits moved {drift:.3g} from the float model"


FALLBACK_CASE = hf.HFCase("fallback_llama", dict(
    model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0)))


@pytest.mark.parametrize("qtype, rows_of_64, rows_of_80", [
    ("Q4_K", "Q5_0", "F16"), ("Q5_K", "Q5_1", "F16"), ("Q6_K", "Q8_0", "F16"), ("Q8_0", "Q8_0", "F16")])
def test_rows_the_block_does_not_divide_fall_back_like_llama_quantize(qtype, rows_of_64, rows_of_80, tmp_path):
    """K-quants fall back per llama-quantize (Q5_0 / Q5_1 / Q8_0, then F16), Q8_0 to F16 as convert does;
    transformers still reads the mixed file as the dequantised weights."""
    model = hf.build(FALLBACK_CASE, torch.float32)
    path = gw.write_gguf(model, tmp_path / "m.gguf", tensor_type=qtype)
    types = gw.tensor_types(path)
    assert types["blk.0.attn_q.weight"] == rows_of_64  # rows of hidden_size = 64
    assert types["blk.0.ffn_down.weight"] == rows_of_80  # rows of intermediate_size = 80
    loaded = load_with_transformers(path, FALLBACK_CASE)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.ndim == 2:
                stored = rows_of_64 if param.shape[1] == 64 else rows_of_80
                param.copy_(torch.from_numpy(dequantised(param.detach().numpy(), stored)))
    error = hf.relative_error(hf.logits(loaded, INPUT_IDS), hf.logits(reference, INPUT_IDS))
    assert error <= F32_TOL


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_rows_the_block_does_not_divide_are_refused_naming_the_tensor(qtype, tmp_path):
    """llama-quantize throws for Q4_0 / Q4_1 rows not a multiple of 32; so does the writer."""
    model = hf.build(FALLBACK_CASE, torch.float32)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight.*80.*32"):
        gw.write_gguf(model, tmp_path / "m.gguf", tensor_type=qtype)


def test_unknown_tensor_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Q3_K"):
        gw.write_gguf(hf.build(CASES[0], torch.float32), tmp_path / "m.gguf", tensor_type="Q3_K")


# ---------------------------------------------------------------------------------------------
# What llama.cpp cannot represent is refused


@pytest.mark.parametrize("name, change, culprit", [
    ("qwen2_moe_shared_mlponly_gqa1", {}, "mlp_only_layers"),
    ("qwen2_moe_step2_norm_tied_gqa7", {"mlp_only_layers": []}, "decoder_sparse_step"),
    ("qwen2_moe_step2_norm_tied_gqa7", {"decoder_sparse_step": 1}, "norm_topk_prob"),
    ("qwen3_moe_norm_mlponly_gqa2", {"mlp_only_layers": [], "norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen2_gqa3", {}, "head_dim"),
    ("mixtral_gqa4", {}, "model_type"),
    ("olmoe_gqa2", {}, "model_type"),
    ("llama_llama3rope_tied_gqa7", {"model_type": "qwen3"}, "rope_type"),
])
def test_unrepresentable_models_are_refused_naming_the_culprit(name, change, culprit):
    """A model whose GGUF would describe another model (to llama.cpp) is refused, naming why."""
    config = hf.make_config(hf.HFCase(name, dict(hf.case(name).config, **change)))
    with pytest.raises(ValueError, match=culprit):
        gw.metadata(config)


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata


@pytest.mark.parametrize("hf_case", CASES[:2], ids=CASE_IDS[:2])
def test_minimal_vocab_loads_as_a_transformers_tokenizer(hf_case, tmp_path):
    """transformers builds a working byte-level BPE tokenizer from the default vocabulary."""
    model = hf.build(hf_case, torch.float32)
    path = gw.write_gguf(model, tmp_path / "m.gguf")
    meta = read_metadata(path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert len(tok) == model.config.vocab_size
    assert tok.eos_token_id == meta["tokenizer.ggml.eos_token_id"]
    assert tok.bos_token_id == meta["tokenizer.ggml.bos_token_id"]
    ids = tok.encode("Hello, big world!", add_special_tokens=False)
    assert tok.decode(ids) == "Hello, big world!"
    assert "Ġb" in tok.convert_ids_to_tokens(ids)  # a merge was applied
    assert max(ids) < model.config.vocab_size
    # and the same vocabulary comes back through vocab_from_tokenizer (convert's get_vocab_base)
    vocab = gw.vocab_from_tokenizer(tok, model.config.vocab_size, pre=meta["tokenizer.ggml.pre"])
    assert vocab.tokens == meta["tokenizer.ggml.tokens"]
    assert vocab.merges == meta["tokenizer.ggml.merges"]
    assert vocab.token_types == meta["tokenizer.ggml.token_type"]
    again = read_metadata(gw.write_gguf(model, tmp_path / "again.gguf", tokenizer=tok))
    assert again["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]
    assert again["tokenizer.ggml.merges"] == meta["tokenizer.ggml.merges"]


def test_a_vocabulary_of_the_wrong_size_is_refused(tmp_path):
    model = hf.build(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="vocab_size=97"):
        gw.write_gguf(model, tmp_path / "m.gguf", tokenizer=gw.minimal_vocab(96))


@pytest.mark.parametrize("vocab_size", [5, 97, 300, 70_000])
def test_minimal_vocab_is_valid_at_any_size(vocab_size):
    """Exactly vocab_size distinct tokens; every merge joins two earlier tokens into a listed one."""
    vocab = gw.minimal_vocab(vocab_size)
    assert len(vocab.tokens) == len(set(vocab.tokens)) == vocab_size
    index = {t: i for i, t in enumerate(vocab.tokens)}
    assert vocab.merges
    for merge in vocab.merges:
        left, right = merge.split(" ")
        assert index[left] < index[left + right] and index[right] < index[left + right]
    assert vocab.token_types[vocab.eos_token_id] == gguf.TokenType.CONTROL
