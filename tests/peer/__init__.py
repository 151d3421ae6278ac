"""Independent peers for d2m_ref: references built from transformers' own modules.

Nothing here imports d2m_ref.  `hf` builds, saves and runs the seven Hugging Face families (and
makes transformers compute in float64 where it normally drops to float32); `dense2moe` composes a
Dense2MoE reference from transformers modules, since transformers has no such model.
"""
