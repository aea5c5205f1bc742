"""Qwen2.5-VL (vision tower + language model) in Flax NNX, numerically equal to transformers.

Why NNX: it is Flax's current API; modules are plain Python objects holding `nnx.Param`s, so the
port reads like the PyTorch reference it must match, parameters carry their logical sharding axes as
metadata (see eureka_jax/sharding.py), and `nnx.split` gives the (graphdef, state) pair that the
trainer and sampler pass through `jax.jit` as ordinary pytrees.

Static shapes. The host (eureka_jax/processing.py) turns every prompt's images into one padded
stream of patches per batch row, already permuted into the window order the reference uses, with
segment ids that say which patches may attend to each other (same window, or same image for the
full-attention blocks). The language model takes 3-D M-RoPE positions computed on the host and a
`token_source` map that says which merged vision token fills each <|image_pad|> slot. Nothing in
this file depends on the number or sizes of images, so one compiled program serves a shape bucket.

Depth. The decoder layers (and the vision blocks) are one module whose parameters have a leading
layer axis (logical name "layers", never sharded; created by nnx.vmap) and run as one lax.scan,
so a program's size and compile time do not grow with the number of layers. `model.remat` puts
jax.checkpoint around each scanned decoder layer. The KV cache is stacked the same way.

Attention masks: a teacher-forced forward or a prefill is causal over its T tokens, with
`kv_valid[b, s]` False on left padding; the vision tower attends within windows (a distance bound
of one window) or images. Both go through eureka_jax/attention.py, which never materialises the
[B, N, T, S] scores (backend: `attention_impl`). A decoding step attends to its group's prompt
(shared by the G samples, stored once) and to its own generated tokens so far (see KVCache).

Einsum letters: B batch, T query length, S key length, N heads, K kv heads, G query heads per kv
head, H head dim, D model dim, F mlp dim, V vocab, P patches, C patch features, M merged tokens;
in shape suffixes also Y layers (the scanned axis) and L generated tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from eureka_jax import attention
from eureka_jax.errors import InputError
from eureka_jax.models.decoder import (
    DTYPES,
    CausalLM,
    Dense,
    GatedMLP,
    RMSNorm,
    TextConfig,
    apply_rotary,
    check_runtime_fields,
    inverse_frequencies,
    normal,
    project,
    scan_layers,
    stacked,
)
from eureka_jax.sharding import constrain

VISION_NORM_EPS = 1e-6  # hard-coded in the reference vision tower


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_features(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_patches(self) -> int:
        """Patches in a full attention window: window_size // spatial_merge_size // patch_size
        merge units per side (eureka_jax/processing/layout.py). A window is one contiguous run
        of the window-ordered stream, at most this long (edge windows are shorter)."""
        side = self.window_size // self.spatial_merge_size // self.patch_size
        return (side * self.spatial_merge_size) ** 2


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    # Special token ids as the checkpoint declares them (kept for export; None = not set).
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime choices, not part of a Hugging Face checkpoint.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # none | full | dots: what each decoder layer keeps for the backward pass
    freeze_vision: bool = False  # stop gradients at the vision tower's output
    # Response positions whose [.., V] logits exist at once when log-probs are computed from
    # hidden states (eureka_jax/policy.py); 0 = all of them. A 152k vocabulary makes the full
    # [B, L, V] float32 logits of a 4096-token response 2.5 GB per sequence.
    logits_chunk: int = 512
    attention_impl: str = "auto"  # auto | xla | dense | pallas_tpu | cudnn: see attention.py

    def __post_init__(self):
        check_runtime_fields(self)
        text, vision = self.text, self.vision
        if text.hidden_size % text.num_attention_heads:
            raise InputError("text hidden_size must be divisible by num_attention_heads")
        if text.num_attention_heads % text.num_key_value_heads:
            raise InputError("num_attention_heads must be divisible by num_key_value_heads")
        if sum(text.mrope_section) * 2 != text.head_dim:
            raise InputError(
                f"mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}"
            )
        if vision.out_hidden_size != text.hidden_size:
            raise InputError("vision out_hidden_size must equal the text hidden_size")
        if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
            raise InputError("vision head_dim must be an integer divisible by 4 (2-D rotary)")

    def replace(self, **changes) -> Qwen25VLConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **runtime) -> Qwen25VLConfig:
        """From a Hugging Face config.json: text fields flat (hub) or nested in text_config."""
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or []
        if model_type != "qwen2_5_vl" and "Qwen2_5_VLForConditionalGeneration" not in architectures:
            raise InputError(
                f"config.json describes model_type={model_type!r} architectures={architectures}; "
                "eureka_jax supports Qwen2.5-VL (model_type 'qwen2_5_vl') only"
            )
        text = {**hf, **(hf.get("text_config") or {})}
        if text.get("use_sliding_window"):
            raise InputError(
                "use_sliding_window=true is not supported (Qwen2.5-VL does not use it)"
            )
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", text.get("rope_theta", TextConfig.rope_theta))
        mrope_section = rope.get("mrope_section", TextConfig.mrope_section)
        vision = dict(hf.get("vision_config") or {})
        vision_rope = vision.get("rope_parameters") or {}
        vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
        vision_kwargs = {k: v for k, v in vision.items() if k in vision_fields}
        if "in_chans" in vision:  # older hub configs
            vision_kwargs.setdefault("in_channels", vision["in_chans"])
        vision_kwargs["fullatt_block_indexes"] = tuple(
            vision.get("fullatt_block_indexes", VisionConfig.fullatt_block_indexes)
        )
        vision_kwargs["rope_theta"] = vision_rope.get("rope_theta", VisionConfig.rope_theta)
        text_fields = {f.name for f in dataclasses.fields(TextConfig)} - {
            "attention_bias", "o_proj_bias"}
        text_kwargs = {k: v for k, v in text.items() if k in text_fields}
        text_kwargs.update(rope_theta=float(rope_theta), mrope_section=tuple(mrope_section))
        if text_kwargs.get("num_key_value_heads") is None:
            text_kwargs["num_key_value_heads"] = text_kwargs.get("num_attention_heads", 28)
        tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        id_fields = ("image_token_id", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id")
        ids = {k: hf[k] for k in id_fields if k in hf}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = text.get(k)
            ids[k] = tuple(value) if isinstance(value, list) else value
        return cls(
            vision=VisionConfig(**vision_kwargs),
            text=TextConfig(**text_kwargs),
            tie_word_embeddings=tie,
            **ids,
            **runtime,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers loads as Qwen2_5_VLForConditionalGeneration."""
        text = dataclasses.asdict(self.text)
        del text["attention_bias"], text["o_proj_bias"]  # fixed for Qwen2.5-VL
        mrope_section = list(text.pop("mrope_section"))
        rope_theta = text.pop("rope_theta")
        text.update(
            model_type="qwen2_5_vl_text",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": rope_theta,
                "mrope_section": mrope_section,
            },
            tie_word_embeddings=self.tie_word_embeddings,
        )
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, k)
            text[k] = list(value) if isinstance(value, tuple) else value
        vision = dataclasses.asdict(self.vision)
        vision["fullatt_block_indexes"] = list(vision["fullatt_block_indexes"])
        vision.update(model_type="qwen2_5_vl_vision")
        vision.pop("rope_theta")
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
        }


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class VisionInputs:
    """One padded, window-ordered patch stream per batch row (see eureka_jax/processing.py)."""

    patches_BxPxC: jax.Array  # float pixel patches
    pos_hw_BxPx2: jax.Array  # int32 (row, column) of each patch for the 2-D rotary embedding
    window_segment_BxP: jax.Array  # int32 attention-window id; -1 marks padding
    image_segment_BxP: jax.Array  # int32 image id (full-attention blocks); -1 marks padding


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


class VisionAttention(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, rngs: nnx.Rngs):
        vision = config.vision
        d = vision.hidden_size
        self.num_heads = vision.num_heads
        self.attention_impl = config.attention_impl
        self.qkv = Dense(d, 3 * d, ("vision_embed", "vision_qkv"), use_bias=True, config=config,
                         rngs=rngs)
        self.proj = Dense(d, d, ("vision_qkv", "vision_embed"), use_bias=True, config=config,
                          rngs=rngs)

    def __call__(self, x_BxPxD, cos_BxPxH, sin_BxPxH, inputs: VisionInputs, full_attention,
                 window_distance: int):
        """Attention within images (`full_attention`, a traced bool: the block is one of
        fullatt_block_indexes) or within windows; -1 segments (padding) attend to nothing.
        `window_distance` bounds how far apart two patches of one window are, which is what
        makes window attention cost O(P * window) instead of O(P^2); lax.cond runs one of the
        two per block."""
        b, p, d = x_BxPxD.shape
        qkv = self.qkv(x_BxPxD).reshape(b, p, 3, self.num_heads, d // self.num_heads)
        q_BxPxNxH, k_BxPxNxH, v_BxPxNxH = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_BxPxNxH = apply_rotary(q_BxPxNxH, cos_BxPxH, sin_BxPxH)
        k_BxPxNxH = apply_rotary(k_BxPxNxH, cos_BxPxH, sin_BxPxH)

        def attend(segment_BxP, max_distance):
            return attention.attention(
                q_BxPxNxH, k_BxPxNxH, v_BxPxNxH, causal=False, segment_ids_BxS=segment_BxP,
                max_distance=max_distance, implementation=self.attention_impl)

        out_BxPxNxH = jax.lax.cond(
            full_attention, lambda: attend(inputs.image_segment_BxP, None),
            lambda: attend(inputs.window_segment_BxP, window_distance))
        return self.proj(out_BxPxNxH.reshape(b, p, d))


class VisionBlock(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, rngs: nnx.Rngs):
        vision = config.vision
        self.norm1 = RMSNorm(vision.hidden_size, VISION_NORM_EPS, config)
        self.norm2 = RMSNorm(vision.hidden_size, VISION_NORM_EPS, config)
        self.attn = VisionAttention(config, rngs)
        self.mlp = GatedMLP(
            vision.hidden_size, vision.intermediate_size, vision.hidden_act,
            ("vision_embed", "vision_mlp"), use_bias=True, config=config, rngs=rngs,
        )

    def __call__(self, x_BxPxD, cos, sin, inputs: VisionInputs, full_attention,
                 window_distance: int):
        x_BxPxD = x_BxPxD + self.attn(self.norm1(x_BxPxD), cos, sin, inputs, full_attention,
                                      window_distance)
        return x_BxPxD + self.mlp(self.norm2(x_BxPxD))


class PatchMerger(nnx.Module):
    """RMSNorm, then 2x2 neighbouring patches (consecutive rows) concatenated and projected."""

    def __init__(self, config: Qwen25VLConfig, rngs: nnx.Rngs):
        vision = config.vision
        merged = vision.hidden_size * vision.merge_unit
        self.merge_unit = vision.merge_unit
        self.ln_q = RMSNorm(vision.hidden_size, VISION_NORM_EPS, config)
        self.fc1 = Dense(merged, merged, ("vision_mlp", "vision_embed"), use_bias=True,
                         config=config, rngs=rngs)
        self.fc2 = Dense(merged, vision.out_hidden_size, ("vision_embed", "embed"), use_bias=True,
                         config=config, rngs=rngs)

    def __call__(self, x_BxPxD):
        b, p, d = x_BxPxD.shape
        x_BxMxC = self.ln_q(x_BxPxD).reshape(b, p // self.merge_unit, d * self.merge_unit)
        # nn.GELU() in the reference is the exact (erf) form.
        return self.fc2(jax.nn.gelu(self.fc1(x_BxMxC), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, rngs: nnx.Rngs):
        vision = config.vision
        self.config = vision
        self.dtype = DTYPES[config.compute_dtype]
        # Conv3d with stride == kernel over a flattened patch is a matmul; no bias in the reference.
        self.patch_embed = nnx.Param(
            normal(rngs, (vision.patch_features, vision.hidden_size), DTYPES[config.param_dtype]),
            logical_axes=("patch", "vision_embed"),
        )
        self.blocks = stacked(lambda rngs: VisionBlock(config, rngs), vision.depth, rngs)
        self.merger = PatchMerger(config, rngs)

    def __call__(self, inputs: VisionInputs) -> jax.Array:
        """Window-ordered patches -> merged tokens [B, P/4, out_hidden_size] in window order."""
        x_BxPxD = project(inputs.patches_BxPxC.astype(self.dtype),
                          self.patch_embed[...].astype(self.dtype))
        x_BxPxD = constrain(x_BxPxD, ("batch", "length", "act_embed"))
        inv_freq = inverse_frequencies(self.config.rope_theta, self.config.head_dim // 2)
        pos = inputs.pos_hw_BxPx2.astype(jnp.float32)
        freqs_h = pos[..., 0:1] * inv_freq
        freqs_w = pos[..., 1:2] * inv_freq
        freqs = jnp.concatenate([freqs_h, freqs_w], axis=-1)
        freqs_BxPxH = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(freqs_BxPxH), jnp.sin(freqs_BxPxH)
        full_attention = set(self.config.fullatt_block_indexes)
        full_attention_Y = jnp.asarray([i in full_attention for i in range(self.config.depth)])
        window_distance = self.config.window_patches - 1

        def block_fn(block, x_BxPxD, full):
            return block(x_BxPxD, cos, sin, inputs, full, window_distance), None

        x_BxPxD, _ = scan_layers(self.blocks, block_fn, x_BxPxD, full_attention_Y)
        return self.merger(x_BxPxD)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Qwen25VL(CausalLM):
    """Qwen2_5_VLForConditionalGeneration: vision tower, decoder, (tied or untied) LM head. The
    language model's methods (embed, decode, decode_step, logits, __call__) are CausalLM's."""

    def __init__(self, config: Qwen25VLConfig, rngs: nnx.Rngs):
        self.visual = VisionTower(config, rngs)
        self.init_language_model(config, rngs)

    def encode_images(self, vision: VisionInputs) -> jax.Array:
        """Merged vision tokens [B, M, D] of every row's patch stream, in window order."""
        features_BxMxD = self.visual(vision)
        if self.config.freeze_vision:
            features_BxMxD = jax.lax.stop_gradient(features_BxMxD)
        return features_BxMxD

