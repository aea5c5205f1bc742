"""Tiny random InternVL checkpoints and prompts for tests (no hub downloads, deterministic).

    model_dir = make_hf_model_dir(tmp_path / "m", **VARIANTS["qwen2_gqa2_untied"])
    prompts = {name: make_prompt(config, spec, seed) for name, spec in PROMPTS.items()}
    batch = prompt_batch(list(prompts.values()), config, length=64, tiles=5)   # the port's input
    inputs = hf_inputs([prompts["text"]], config)                             # transformers' input

Importable without torch: torch and transformers are imported inside the functions that need
them. Tiles are random pixel arrays (no image preprocessing): that is the host's job, tested
elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eureka_jax.batch import PromptBatch
from eureka_jax.models.internvl import InternVisionInputs, InternVLConfig, text_positions

VOCAB_SIZE = 128
IMAGE_TOKEN_ID = 127
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 1, 2, 0
TEXT_TOKENS = (3, 120)  # the range random text tokens are drawn from
TILE = 56  # 4 x 4 patches of 14 px -> 2 x 2 = 4 vision tokens per tile

# name -> tiny_hf_config overrides. 4 attention heads: kv heads 4 / 2 / 1 are GQA groups of 1, 2
# and 4. The vision options vary with them so that each is exercised somewhere.
VARIANTS: dict[str, dict[str, Any]] = {
    "qwen2_gqa2_untied": dict(text_model_type="qwen2", num_key_value_heads=2,
                              tie_word_embeddings=False),
    "qwen2_gqa1_tied": dict(text_model_type="qwen2", num_key_value_heads=4,
                            tie_word_embeddings=True, use_qk_norm=True, norm_type="rms_norm",
                            use_mean_pooling=False),
    "llama_gqa4_tied": dict(text_model_type="llama", num_key_value_heads=1,
                            tie_word_embeddings=True, vision_attention_bias=True,
                            text_attention_bias=True, vision_feature_layer=-2,
                            rope_theta=500000.0),
    "llama_gqa2_untied": dict(text_model_type="llama", num_key_value_heads=2,
                              tie_word_embeddings=False, use_qk_norm=True,
                              vision_feature_layer=1),
}


def tiny_hf_config(*, text_model_type: str = "qwen2", num_key_value_heads: int = 2,
                   tie_word_embeddings: bool = False, use_qk_norm: bool = False,
                   norm_type: str = "layer_norm", use_mean_pooling: bool = True,
                   vision_attention_bias: bool = False, text_attention_bias: bool = False,
                   vision_feature_layer: int = -1,
                   rope_theta: float = 1000000.0, dynamic_rope_factor: float | None = None,
                   image_size: int = TILE,
                   initializer_range: float = 0.2) -> dict[str, Any]:
    """A transformers InternVLConfig as a dict: 2-layer InternViT of width 32, 2-layer decoder
    of width 64 (head_dim 16), vocabulary 128. `text_attention_bias` is Llama's attention_bias
    (q/k/v and o_proj biases, as InternLM2 "bias" converts); Qwen2 has q/k/v biases anyway."""
    text = {
        "model_type": text_model_type, "vocab_size": VOCAB_SIZE, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": num_key_value_heads, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512, "initializer_range": initializer_range,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": tie_word_embeddings, "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID,
    }
    if text_model_type == "llama":
        text["attention_bias"] = text_attention_bias
    if dynamic_rope_factor is not None:
        text["rope_parameters"] = {"rope_type": "dynamic", "factor": dynamic_rope_factor,
                                   "rope_theta": rope_theta}
    vision = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "image_size": image_size, "patch_size": 14,
        "use_qk_norm": use_qk_norm, "norm_type": norm_type, "use_mean_pooling": use_mean_pooling,
        "attention_bias": vision_attention_bias, "initializer_range": initializer_range,
    }
    tokens_per_tile = (image_size // 14 // 2) ** 2
    return {
        "model_type": "internvl", "text_config": text, "vision_config": vision,
        "image_token_id": IMAGE_TOKEN_ID, "image_seq_length": tokens_per_tile,
        "downsample_ratio": 0.5, "vision_feature_layer": vision_feature_layer,
        "tie_word_embeddings": tie_word_embeddings,
    }


def make_hf_model(seed: int = 0, **overrides):
    """A random float32 transformers InternVLForConditionalGeneration (eval mode, sdpa).

    transformers initialises the cls token and position embedding to zero, norms to ones and
    zeros and the layer scales to 0.1; those are redrawn here so that a port that ignored any of
    them would fail the parity tests."""
    import torch
    from transformers import InternVLConfig as HFInternVLConfig
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    hf = tiny_hf_config(**overrides)
    config = HFInternVLConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings")):
                param.normal_(0.0, 0.5)
            elif "lambda_" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(("norm.weight", "layernorm_before.weight",
                                "layernorm_after.weight", "layer_norm.weight")):
                param.uniform_(0.7, 1.3)
            elif param.ndim == 1 and name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


def make_hf_model_dir(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """save_pretrained of `make_hf_model(seed, **overrides)` into `path`."""
    path = Path(path)
    make_hf_model(seed, **overrides).save_pretrained(path)
    return path


def load_reference(model_dir: str | os.PathLike):
    import torch
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    input_ids_T: np.ndarray  # int32, <IMG_CONTEXT> tokens in place of every image's tiles
    tiles_IxCxSxS: np.ndarray  # float32 tiles of all the prompt's images, in order


# name -> alternating text lengths and image tile counts: [text, tiles, text, tiles, ..., text].
PROMPTS: dict[str, tuple[int, ...]] = {
    "text": (13,),
    "one_tile": (5, 1, 6),
    "many_tiles": (3, 5, 4),
    "two_images": (2, 2, 3, 3, 2),
}


def make_prompt(config: InternVLConfig, spec: Sequence[int], seed: int,
                tile: int | None = None) -> Prompt:
    """Random text tokens and random tiles of side `tile` (default: the config's image_size);
    each tile stands for config.tokens_per_tile <IMG_CONTEXT> tokens at that tile size."""
    rng = np.random.default_rng(seed)
    tile = tile or config.vision.image_size
    per_tile = (tile // config.vision.patch_size // config.shuffle_factor) ** 2
    ids, tiles = [], 0
    for i, count in enumerate(spec):
        if i % 2 == 0:
            ids.append(rng.integers(*TEXT_TOKENS, size=count))
        else:
            ids.append(np.full(count * per_tile, config.image_token_id))
            tiles += count
    pixels = rng.standard_normal((tiles, config.vision.num_channels, tile, tile))
    return Prompt(np.concatenate(ids).astype(np.int32), pixels.astype(np.float32))


def token_sources(input_ids_T: np.ndarray, image_token_id: int) -> np.ndarray:
    """k for the k-th <IMG_CONTEXT> token, -1 elsewhere."""
    is_image = input_ids_T == image_token_id
    return np.where(is_image, np.cumsum(is_image) - 1, -1).astype(np.int32)


def prompt_batch(prompts: Sequence[Prompt], config: InternVLConfig, *, length: int,
                 tiles: int, keys: Sequence[int] | None = None) -> PromptBatch:
    """The port's left-padded PromptBatch (host arrays): `length` tokens and `tiles` tiles per
    row (padding tiles zero and invalid); vision None when no prompt has an image."""
    b = len(prompts)
    ids = np.full((b, length), PAD_TOKEN_ID, np.int32)
    mask = np.zeros((b, length), bool)
    sources = np.full((b, length), -1, np.int32)
    side = max((p.tiles_IxCxSxS.shape[-1] for p in prompts if len(p.tiles_IxCxSxS)),
               default=config.vision.image_size)
    pixels = np.zeros((b, tiles, config.vision.num_channels, side, side), np.float32)
    valid = np.zeros((b, tiles), bool)
    for row, prompt in enumerate(prompts):
        t, count = len(prompt.input_ids_T), len(prompt.tiles_IxCxSxS)
        ids[row, length - t:] = prompt.input_ids_T
        mask[row, length - t:] = True
        sources[row, length - t:] = token_sources(prompt.input_ids_T, config.image_token_id)
        pixels[row, :count] = prompt.tiles_IxCxSxS
        valid[row, :count] = True
    has_images = any(len(p.tiles_IxCxSxS) for p in prompts)
    return PromptBatch(
        input_ids_BxT=ids,
        attention_mask_BxT=mask,
        positions_3xBxT=text_positions(mask),
        next_position_B=mask.sum(axis=1).astype(np.int32),
        prompt_key_B=np.asarray(keys if keys is not None else range(b), np.uint32),
        token_source_BxT=sources,
        vision=InternVisionInputs(pixels, valid) if has_images else None,
    )


def hf_inputs(prompts: Sequence[Prompt], config: InternVLConfig) -> dict:
    """transformers' inputs for a left-padded batch: input_ids, attention_mask, explicit
    position_ids (0..n-1 over the real tokens) and pixel_values (all tiles, in order) if any."""
    import torch

    length = max(len(p.input_ids_T) for p in prompts)
    ids = np.full((len(prompts), length), PAD_TOKEN_ID, np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt.input_ids_T):] = prompt.input_ids_T
        mask[row, length - len(prompt.input_ids_T):] = 1
    inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
              "position_ids": torch.from_numpy(text_positions(mask)[0].astype(np.int64))}
    tiles = [p.tiles_IxCxSxS for p in prompts if len(p.tiles_IxCxSxS)]
    if tiles:
        inputs["pixel_values"] = torch.from_numpy(np.concatenate(tiles))
    return inputs


def reference_logits(hf_model, inputs: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(**inputs).logits.float().numpy()
