"""Export a generator stage's output (a pretrain rung, sft, dpo or grpo) as a diffusers folder that
`QwenImagePipeline.from_pretrained` loads: transformer (EMA weights), VAE and scheduler config in diffusers'
layout, plus `kiln.json` naming the text encoder and the sampling defaults.

The text encoder is referenced, not copied: Qwen-Image's own (Qwen2.5-VL) would be 15 GB of weights the user
already has under the hub id the config names, and the tiny preset's MiniLM is not a Qwen2.5-VL that the pipeline
could load. So model_index.json leaves text_encoder and tokenizer empty, and captions are encoded with
kiln.text_encoder (the config in kiln.json) and passed as `prompt_embeds` / `prompt_embeds_mask`:

    pipe = QwenImagePipeline.from_pretrained(folder, text_encoder=None, tokenizer=None)
    text, mask = build_text_encoder(TextEncoderConfig(**json.load(open(folder / "kiln.json"))["text_encoder"]))(captions)
    images = pipe(prompt_embeds=text, prompt_embeds_mask=mask.long(), ...).images

A LoRA stage (lora.stages) is written as its base pipeline (the nearest stage, or released weights, with full
weights under it) plus the adapter as diffusers writes it, `pytorch_lora_weights.safetensors`, in the same folder:

    pipe.load_lora_weights(folder)

Several LoRA stages in a row (sft -> dpo -> grpo) become one adapter of the summed rank, exactly their sum
(kiln/adapters.py diffusers_lora_layers). `merge=True` (`kiln export --merge`) writes the fused full weights instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import QwenImagePipeline

from kiln.adapters import diffusers_lora_layers
from kiln.checkpoint import resolve_checkpoint
from kiln.geometry import latent_channels
from kiln.models import build_backbone
from kiln.sampler import make_scheduler
from kiln.vae import load_vae
from kiln.weights import load_generator, lora_chain
from stages.sampling import load_stage

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights(folder) finds it


def export_diffusers(stage_dir: Path, out_dir: Path, merge: bool = False) -> Path:
    """Write out_dir (created; an existing non-empty folder is refused so nothing is overwritten) and return it.
    merge: a LoRA stage's fused full weights rather than its base plus the adapter file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export: {out_dir} exists and is not empty; choose a new --out folder")
    cfg, model, vae_dir, meta = load_stage(Path(stage_dir))
    if cfg.model.kind != "qwen-image" or cfg.objective.kind != "flow":
        raise ValueError(f"export: a QwenImagePipeline folder needs a qwen-image model trained with the flow objective "
                         f"(this stage: model.kind {cfg.model.kind!r}, objective.kind {cfg.objective.kind!r})")
    if cfg.vae.space_to_depth != 1:
        raise ValueError(f"export: QwenImagePipeline packs the VAE's own latents, so a stage trained on latents folded "
                         f"by vae.space_to_depth={cfg.vae.space_to_depth} does not load there")
    if cfg.vae.encoder != "qwen-image":
        raise ValueError(f"export: vae.encoder={cfg.vae.encoder!r} is not AutoencoderKLQwenImage's encoder, so the "
                         f"exported VAE could not encode images")
    base, base_which, chain = lora_chain(resolve_checkpoint(stage_dir))
    adapter = None
    if chain and not merge:  # the base's full weights in the pipeline, the adapters in diffusers' LoRA file
        model = build_backbone(cfg.model, latent_channels(cfg.vae), cfg.text_encoder.dim)
        load_generator(base, model, base_which)
        adapter = diffusers_lora_layers(chain)
    vae = load_vae(vae_dir, cfg.vae)
    pipe = QwenImagePipeline(scheduler=make_scheduler(cfg.scheduler), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=model.eval())
    pipe.save_pretrained(out_dir)
    if adapter is not None:
        QwenImagePipeline.save_lora_weights(out_dir, transformer_lora_layers=adapter, weight_name=LORA_FILE)
    (out_dir / "kiln.json").write_text(json.dumps({
        "source": str(Path(stage_dir).resolve()),
        "text_encoder": cfg.text_encoder.model_dump(mode="json"),
        "sampler": cfg.sampler.model_dump(mode="json"),  # steps, true-CFG scale, negative prompt kiln generates with
        "resolution": meta.get("resolution"),
        "lora": None if adapter is None else {"file": LORA_FILE, "base": str(base),
                                              "rank": sum(lcfg.rank for lcfg, _ in chain), "stages": len(chain)},
    }, indent=1))
    return out_dir
