"""The demo model: a small deterministic Dense2MoE checkpoint that shows every feature of the layer plan.

`python -m d2m_ref.run` with no --weights runs it; the tests use it as a realistic small model.
Its six layers read as if converted from a ten-layer dense Llama (spec/architecture.md §1.2):

    layer 0  attention + dense MLP                  from dense layer 0
    layer 1  attention + MoE, top-1 of 2, softmax,   experts from layers 1, 2; attention of 1
             norm_topk_prob (two layers fused)
    layer 2  no attention, MoE top-2 of 3, sigmoid   experts from layers 3, 4, 5
             scoring with a selection bias
    layer 3  attention + MoE top-1 of 2 + gated      experts from layers 6, 7; attention of 6
             shared expert
    layer 4  attention + dense MLP                  from layer 8
    layer 5  no attention, dense MLP                 from layer 9

Vocabulary: a byte-level tokenizer (id b = byte b, 256 = `<|endoftext|>`), built with HF
`tokenizers`.  Weights: `synth` random tensors of seed DEMO_SEED, stored as BF16.  Every file is
byte-for-byte reproducible; golden/demo/ holds a copy that tests/test_demo.py proves current.

    python -m d2m_ref.demo --out DIR [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from . import cli
from .config import parse_config
from .errors import InputError
from .files import atomic_write_bytes, printable, refuse_existing
from .synth import write_checkpoint
from .weights import METADATA_CONFIG_KEY

DEMO_SEED = 20240601
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 256
FILES = ("config.json", "model.safetensors", "tokenizer.json")
REGENERATE = "python -m d2m_ref.demo --out golden/demo --force"


def demo_config() -> dict:
    """The demo's config.json as a dict (insertion order is the file's key order)."""
    return {
        "architectures": ["Dense2MoeForCausalLM"],
        "model_type": "dense2moe",
        "base_model_type": "llama",
        "vocab_size": EOS_ID + 1,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 6,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "bfloat16",
        "layer_plan": [
            {"attention": True, "ffn": "dense", "source_layers": [0], "attention_source": 0},
            {"attention": True, "ffn": "moe", "num_experts": 2, "num_experts_per_tok": 1,
             "scoring_func": "softmax", "norm_topk_prob": True,
             "source_layers": [1, 2], "attention_source": 1},
            {"attention": False, "ffn": "moe", "num_experts": 3, "num_experts_per_tok": 2,
             "scoring_func": "sigmoid", "norm_topk_prob": True, "selection_bias": True,
             "source_layers": [3, 4, 5]},
            {"attention": True, "ffn": "moe", "num_experts": 2, "num_experts_per_tok": 1,
             "scoring_func": "softmax", "norm_topk_prob": False,
             "shared_expert_intermediate_size": 128, "shared_expert_gate": True,
             "source_layers": [6, 7], "attention_source": 6},
            {"attention": True, "ffn": "dense", "source_layers": [8], "attention_source": 8},
            {"attention": False, "ffn": "dense", "source_layers": [9]},
        ],
    }


def bytes_to_unicode() -> dict[int, str]:
    """byte -> printable character, GPT-2's table (ByteLevel pre-tokenizer/decoder use the same)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes map to 256, 257, ... in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE without merges: token id b is byte b, id 256 is <|endoftext|>."""
    table = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


def config_text(config: dict) -> str:
    """config.json text: 2-space indent, keys in insertion order, trailing newline."""
    return json.dumps(config, indent=2) + "\n"


def build_demo(directory: str | Path, force: bool = False) -> Path:
    """Write config.json, model.safetensors and tokenizer.json of the demo into `directory`.

    Refuses (OutputExistsError naming the file) to overwrite any of them unless `force`; checks
    all three before writing any, so a refusal leaves the directory as it was.  Each file is
    written to a temporary beside it and renamed into place."""
    directory = Path(directory)
    for name in FILES:
        refuse_existing(directory / name, force)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{directory}: cannot create directory ({exc.strerror or exc})") from None
    config = demo_config()
    cfg = parse_config(config, where="demo config")
    metadata = {METADATA_CONFIG_KEY: json.dumps(config, separators=(",", ":")), "format": "pt",
                "generated_by": "python -m d2m_ref.demo --out DIR"}
    write_checkpoint(cfg, directory / "model.safetensors", seed=DEMO_SEED, storage="BF16",
                     metadata=metadata, force=force)
    atomic_write_bytes(directory / "config.json", config_text(config).encode("utf-8"), force=force)
    tokenizer_text = byte_tokenizer().to_str(pretty=True) + "\n"
    atomic_write_bytes(directory / "tokenizer.json", tokenizer_text.encode("utf-8"), force=force)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2m_ref.demo",
                                     description="Write the demo Dense2MoE model (config, BF16 weights, tokenizer).")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the three files into")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    return cli.main_with_status(parser, demo_command, argv)


def demo_command(args: argparse.Namespace) -> int:
    out = build_demo(args.out, force=args.force)
    print(f"wrote {', '.join(printable(out / name) for name in FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
