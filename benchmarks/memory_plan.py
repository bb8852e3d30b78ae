"""Per-GPU memory plan for training a preset's transformer, computed from the model rather than guessed.

Parameters are counted on the meta device (no memory is allocated). Activation memory is measured the same way: one
bf16 forward pass on meta tensors at the given resolution and text length, with autograd's saved-tensor hooks adding
up every tensor kept for the backward pass; running it with 1 and 2 blocks separates one block's share from the
rest (embeddings, output layer). Attention is counted as a fused (flash / memory-efficient) kernel keeps it: query,
key, value, output and the fp32 log-sum-exp, not the L x L probabilities the meta device's math path would save.
The plan then adds, per GPU:

- training state: fp32 master weights 4 B + fp32 gradients 4 B + AdamW moments 8 B = 16 B per parameter, divided by
  the number of GPUs under FSDP2 full sharding (DDP keeps it all on every GPU);
- FSDP2's working set: the bf16 weights of two blocks gathered at once (the one computing and the one prefetched)
  and one block's unsharded bf16 gradients before their reduce-scatter;
- activations: every block's saved tensors without activation checkpointing; with it, only each block's input
  (image + text hidden states, bf16) plus one block's saved tensors while that block is recomputed.

LoRA post-training (`lora.*` of the preset, or --lora-rank) is planned as Kiln runs it: the frozen base kept in fp32
(4 B per parameter, the dtype the trainer builds it in; bf16 autocast computes), replicated on every GPU (DDP) or
sharded with the adapter (FSDP2, which then gathers two fp32 blocks at a time), the adapter's fp32 weights,
gradients and AdamW moments (16 B per adapter parameter), no second model for DPO's or GRPO's reference (it is the
base with the adapter switched off), and the activations measured with the adapter attached. A
full-weight DPO/GRPO row adds its frozen fp32 reference copy (sharded like the model) for comparison. Batch: images per
GPU (a DPO pair is two).

python benchmarks/memory_plan.py --preset qwen-image --gpus 8 --gpu-gb 80 --resolution 1328 --text-tokens 256
"""

from __future__ import annotations

import argparse

import torch

from kiln.adapters import attach_lora
from kiln.config import load_config
from kiln.geometry import TOKEN_PATCH, latent_channels, token_grid, vae_factor
from kiln.models import build_backbone, count_parameters, predict

GIB = 2**30


class FusedAttentionSaves(torch.autograd.Function):
    """scaled_dot_product_attention that saves what a fused GPU kernel saves for backward (measurement only)."""

    @staticmethod
    def forward(ctx, query, key, value, kwargs):
        with torch.no_grad():
            out = SDPA(query, key, value, **kwargs)  # (B, H, L, d)
        logsumexp = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)  # (B, H, L)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("memory measurement only")


SDPA = torch.nn.functional.scaled_dot_product_attention


def fused_sdpa(query, key, value, **kwargs):
    return FusedAttentionSaves.apply(query, key, value, kwargs)


def saved_activation_bytes(cfg, num_layers: int, resolution: int, text_tokens: int, lora=None) -> int:
    """Bytes autograd keeps for backward in one bf16 forward of a num_layers-block model, batch 1 (meta tensors);
    lora: with that adapter attached (the base frozen)."""
    model_cfg = cfg.model.model_copy(update={"num_layers": num_layers, "gradient_checkpointing": False})
    model = build_backbone(model_cfg, latent_channels(cfg.vae), cfg.text_encoder.dim, device="meta")
    if lora is not None:
        with torch.device("meta"):
            attach_lora(model, lora)
    model = model.to(torch.bfloat16)
    latent = resolution // vae_factor(cfg.vae)
    grid = token_grid(latent, latent)
    x = torch.randn(1, grid[0] * grid[1], latent_channels(cfg.vae) * TOKEN_PATCH**2, device="meta",
                    dtype=torch.bfloat16)  # (1, N_img, C*4)
    text = torch.randn(1, text_tokens, cfg.text_encoder.dim, device="meta", dtype=torch.bfloat16)  # (1, L, D)
    mask = torch.ones(1, text_tokens, dtype=torch.bool, device="meta")
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            predict(model, x, torch.full((1,), 0.5, device="meta"), text, mask, grid)
    finally:
        torch.nn.functional.scaled_dot_product_attention = SDPA
    return sum(saved.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen-image")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--resolution", type=int, default=1328)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--reserve", type=float, default=0.1, help="fraction kept free (allocator, NCCL, kernels)")
    parser.add_argument("--lora-rank", type=int, default=None, help="plan LoRA at this rank (default: the preset's)")
    args = parser.parse_args()
    cfg = load_config(args.preset, args.overrides)
    lora = cfg.lora.model_copy(update={"rank": args.lora_rank, "alpha": float(args.lora_rank)}) \
        if args.lora_rank else cfg.lora
    mc = cfg.model
    params = count_parameters(build_backbone(mc, latent_channels(cfg.vae), cfg.text_encoder.dim, device="meta"))
    one, two = (saved_activation_bytes(cfg, n, args.resolution, args.text_tokens) for n in (1, 2))
    per_block_act, rest_act = two - one, 2 * one - two
    block_params = (params - count_parameters(build_backbone(
        mc.model_copy(update={"num_layers": 1}), latent_channels(cfg.vae), cfg.text_encoder.dim, device="meta"))
    ) / (mc.num_layers - 1)
    dim = mc.num_attention_heads * mc.attention_head_dim
    latent = args.resolution // vae_factor(cfg.vae)
    rows, cols = token_grid(latent, latent)
    image_tokens = rows * cols
    block_input = (image_tokens + args.text_tokens) * dim * 2  # bf16 hidden states kept per block with checkpointing
    act_full = mc.num_layers * per_block_act + rest_act
    act_ckpt = mc.num_layers * block_input + per_block_act + rest_act
    usable = args.gpu_gb * 1e9 * (1 - args.reserve)

    print(f"{args.preset}: {params / 1e9:.2f} B parameters, {mc.num_layers} blocks of {block_params / 1e6:.0f} M; "
          f"{args.resolution} px = {image_tokens} image tokens + {args.text_tokens} text tokens; "
          f"{args.gpus} GPUs x {args.gpu_gb:.0f} GB ({usable / GIB:.0f} GiB usable)")
    print(f"saved activations per image: {per_block_act / GIB:.2f} GiB per block, {rest_act / GIB:.2f} GiB outside "
          f"the blocks; block input kept under checkpointing {block_input / GIB:.3f} GiB")
    adapted = build_backbone(mc, latent_channels(cfg.vae), cfg.text_encoder.dim, device="meta")
    with torch.device("meta"):
        attach_lora(adapted, lora)
    adapter_params = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    lora_one, lora_two = (saved_activation_bytes(cfg, n, args.resolution, args.text_tokens, lora) for n in (1, 2))
    lora_block_act, lora_rest_act = lora_two - lora_one, 2 * lora_one - lora_two
    lora_full = mc.num_layers * lora_block_act + lora_rest_act
    lora_ckpt = mc.num_layers * block_input + lora_block_act + lora_rest_act
    lora_state = 4 * params + 16 * adapter_params
    print(f"LoRA rank {lora.rank} on {', '.join(lora.target_modules)}: {adapter_params / 1e6:.1f} M adapter "
          f"parameters ({100 * adapter_params / params:.2f}% of the model)")
    rows = [
        ("DDP, fp32 state on every GPU, no checkpointing", 16 * params, 0, act_full),
        ("FSDP2 full shard, bf16 compute, no checkpointing", 16 * params / args.gpus, 6 * block_params, act_full),
        ("FSDP2 full shard, bf16 compute, activation checkpointing", 16 * params / args.gpus, 6 * block_params,
         act_ckpt),
        # Kiln's full-weight reference is a frozen fp32 copy of the policy, sharded like it (stages/policy.py).
        ("full-weight DPO/GRPO: FSDP2 + checkpointing + sharded fp32 reference", 20 * params / args.gpus,
         8 * block_params, act_ckpt),
        (f"LoRA rank {lora.rank}, fp32 base on every GPU (DDP), no checkpointing", lora_state, 0, lora_full),
        (f"LoRA rank {lora.rank}, fp32 base on every GPU (DDP), activation checkpointing", lora_state, 0, lora_ckpt),
        (f"LoRA rank {lora.rank}, FSDP2 (base and adapter sharded), activation checkpointing",
         lora_state / args.gpus, 8 * block_params, lora_ckpt),
    ]
    print("| setup | training state | FSDP working set | activations per image | per GPU at batch 1 | images per GPU |")
    print("|---|---|---|---|---|---|")
    for name, state, working, act in rows:
        total = state + working + act
        fits = int((usable - state - working) // act) if usable > state + working else 0
        print(f"| {name} | {state / GIB:.1f} GiB | {working / GIB:.1f} GiB | {act / GIB:.1f} GiB | "
              f"{total / GIB:.1f} GiB | {fits} |")


if __name__ == "__main__":
    main()
