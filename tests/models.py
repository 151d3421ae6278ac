"""Small model configs for the tests, as plain dicts (what a config.json holds)."""

from __future__ import annotations

from hypothesis import strategies as st


def dense_config(family: str = "llama", *, layers: int = 3, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                 head_dim: int = 8, vocab: int = 97, width: int = 48, tie: bool = False, **extra) -> dict:
    """A dense HF-style config dict."""
    d = {"model_type": family, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": width,
         "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
         "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
         "tie_word_embeddings": tie}
    d.update(extra)
    return d


def dense2moe_config(plan: list[dict], *, base: str = "llama", hidden: int = 32, heads: int = 4,
                     kv_heads: int = 2, head_dim: int = 8, vocab: int = 97, width: int = 48, top_k: int = 1,
                     tie: bool = False, **extra) -> dict:
    """A Dense2MoE config dict with the given layer plan."""
    d = dense_config("dense2moe", layers=len(plan), hidden=hidden, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, vocab=vocab, width=width, tie=tie)
    d.update({"base_model_type": base, "moe_intermediate_size": width // 2, "num_experts_per_tok": top_k,
              "layer_plan": plan})
    d.update(extra)
    return d


@st.composite
def moe_entries(draw, attention=None) -> dict:
    """One MoE layer_plan entry with every option drawn."""
    experts = draw(st.integers(1, 4))
    entry = {"attention": draw(st.booleans()) if attention is None else attention, "ffn": "moe",
             "num_experts": experts, "num_experts_per_tok": draw(st.integers(1, experts)),
             "scoring_func": draw(st.sampled_from(["softmax", "sigmoid"])),
             "norm_topk_prob": draw(st.booleans()), "selection_bias": draw(st.booleans())}
    shared = draw(st.sampled_from([0, 0, 16]))
    if shared:
        entry.update(shared_expert_intermediate_size=shared, shared_expert_gate=draw(st.booleans()))
    return entry


@st.composite
def dense2moe_configs(draw) -> dict:
    """Dense2MoE configs: 1–4 layers, any mix of attention / attention-free, dense / MoE, any base."""
    n = draw(st.integers(1, 4))
    plan = []
    for _ in range(n):
        if draw(st.booleans()):
            plan.append(draw(moe_entries()))
        else:
            plan.append({"attention": draw(st.booleans()), "ffn": "dense"})
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 3]))
    return dense2moe_config(plan, base=draw(st.sampled_from(["llama", "qwen2", "qwen3"])),
                            heads=kv_heads * group, kv_heads=kv_heads, head_dim=draw(st.sampled_from([4, 8])),
                            vocab=draw(st.sampled_from([37, 97])), tie=draw(st.booleans()))
