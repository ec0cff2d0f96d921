"""Write a random Qwen3-MoE checkpoint of a chosen size with save_pretrained, for export measurements.

Nothing is downloaded: the weights are transformers' own random initialisation, seeded. The
defaults give about 1.1 GB of float32 weights (2 MoE layers of 32 experts, hidden 1024), the model
docs/benchmarks.md measures peak export memory on:

    python scripts/hf_random_checkpoint.py /tmp/qwen3-moe-1gb
    /usr/bin/time -v portable-moe export --hf /tmp/qwen3-moe-1gb -o /tmp/qwen3-moe-1gb-bundle --moe-lowering sparse
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="checkpoint directory to write")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default: 1024)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers, all MoE (default: 2)")
    parser.add_argument("--experts", type=int, default=32, help="routed experts per layer (default: 32)")
    parser.add_argument("--expert-width", type=int, default=1024, help="width of each expert (default: 1024)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default: 32000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=4,
        norm_topk_prob=True,
    )
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.output)
    size = sum(path.stat().st_size for path in args.output.glob("*.safetensors"))
    print(
        f"wrote {args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {size / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    main()
