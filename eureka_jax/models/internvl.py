"""InternVL2.5 (InternViT + MLP projector + Qwen2 or Llama decoder) in Flax NNX, numerically equal
to transformers' native `InternVLForConditionalGeneration` (model_type "internvl").

The language model is the decoder both families share (models/decoder.py: DecoderLayer, KVCache,
the stacked scan), run with 1-D rotary positions: M-RoPE with a single section of head_dim / 2
frequencies reads only the first of the three position rows, so `positions_3xBxT` carries the
same text positions 0..n-1 (over the non-padding tokens of a left-padded row) in all three rows,
exactly the `attention_mask.cumsum(-1) - 1` that transformers' `generate` computes (its plain
forward without position_ids counts left padding too, so parity tests pass them). Qwen2 and
Llama differ here only in their attention biases (TextConfig.attention_bias, o_proj_bias).
Because the model keeps the families' method contract (encode_images, embed, decode, decode_step,
logits), the sampler and the trainer run it unchanged.

Vision (static shapes). The host cuts every image into 448 px tiles (InternVL's dynamic tiling
plus a thumbnail) and pads each batch row to a tile budget I: `InternVisionInputs`. The tower
runs on all B*I tiles independently (full attention within a tile, cls token included), drops the
cls token, folds each 2x2 block of patches into one token (pixel shuffle, downsample_ratio 0.5)
and projects it to the text width, so a tile of S px gives (S / patch * ratio)^2 tokens (256 for
448 px). The k-th <IMG_CONTEXT> token of a row takes feature k of its row (`token_source_BxT`),
features in tile order; padding tiles' features are computed and never referenced.

Shape letters: B batch, T query length, S key length (in pixels_BxIxCxSxS, the contract's name:
the tile side in pixels), N heads, K kv heads, H head dim, D model dim, V vocab, P patches per
tile (with the cls token in the tower), C channels or patch features, M vision tokens per row,
I tiles per row, Y layers, L generated tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from eureka_jax import attention
from eureka_jax.errors import InputError
from eureka_jax.models.decoder import (
    DTYPES,
    CausalLM,
    Dense,
    RMSNorm,
    TextConfig,
    activation,
    check_runtime_fields,
    inverse_frequencies,
    matmul_precision,
    mrope_cos_sin,
    scan_layers,
    stacked,
)
from eureka_jax.sharding import constrain

TEXT_MODEL_TYPES = ("qwen2", "llama")
# transformers' InternVLVisionRMSNorm default, used by the QK norms whatever layer_norm_eps says.
QK_NORM_EPS = 1e-6
PROJECTOR_NORM_EPS = 1e-5  # nn.LayerNorm's default: the projector passes no eps
ROPE_TYPES = ("default", "dynamic")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InternViTConfig:
    num_hidden_layers: int = 24
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448  # the tile side the position embedding was trained for
    patch_size: int = 14
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"  # layer_norm | rms_norm
    layer_norm_eps: float = 1e-6
    attention_bias: bool = False  # q/k/v biases; the output projection always has one
    use_qk_norm: bool = False
    use_absolute_position_embeddings: bool = True
    # False: a LayerNorm after the last layer (applied to the last layer's output only).
    use_mean_pooling: bool = True
    layer_scale_init_value: float = 0.1  # initial layer scale (random init only)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_features(self) -> int:
        return self.num_channels * self.patch_size**2

    @property
    def grid(self) -> int:
        """Patches per side of the tile the position embedding was trained for."""
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """The defaults are InternVL2.5-1B's shapes (InternViT-300M + Qwen2.5-0.5B) as recalled, not
    checked against its hub config: load real checkpoints with `from_hf_dict` / internvl_io."""

    vision: InternViTConfig = InternViTConfig()
    text: TextConfig = TextConfig(
        vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, mrope_section=(32,),
        max_position_embeddings=32768)
    text_model_type: str = "qwen2"  # qwen2 | llama: which decoder config.json declares
    rope_type: str = "default"  # default | dynamic (dynamic NTK: see `_rotary`)
    rope_factor: float = 1.0  # dynamic NTK's factor (kept for export)
    image_token_id: int = 151667  # <IMG_CONTEXT>
    image_seq_length: int = 256  # vision tokens per tile, as the processor writes them
    downsample_ratio: float = 0.5
    # Index into the tower's hidden states (0 = the embeddings, i = after layer i, negative
    # from the end); -1 is the last layer's output after the final LayerNorm, if there is one.
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime choices, not part of a Hugging Face checkpoint (see Qwen25VLConfig).
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    freeze_vision: bool = False
    logits_chunk: int = 512
    attention_impl: str = "auto"

    def __post_init__(self):
        check_runtime_fields(self)
        text, vision = self.text, self.vision
        if self.text_model_type not in TEXT_MODEL_TYPES:
            raise InputError(f"text_config.model_type {self.text_model_type!r} is not supported: "
                             f"InternVL's language model must be one of {TEXT_MODEL_TYPES}")
        if self.rope_type not in ROPE_TYPES:
            raise InputError(f"text_config.rope_parameters.rope_type {self.rope_type!r} is not "
                             f"supported: use one of {ROPE_TYPES}")
        if text.hidden_size % text.num_attention_heads:
            raise InputError("text_config.hidden_size must be divisible by num_attention_heads")
        if text.num_attention_heads % text.num_key_value_heads:
            raise InputError("text_config.num_attention_heads must be divisible by "
                             "num_key_value_heads")
        biases = (text.attention_bias, text.o_proj_bias)
        if biases != {"qwen2": (True, False)}.get(self.text_model_type, (biases[0],) * 2):
            raise InputError(f"{self.text_model_type} attention biases (q/k/v, o_proj) cannot "
                             f"be {biases}")
        if tuple(text.mrope_section) != (text.head_dim // 2,):
            raise InputError(f"InternVL uses 1-D rotary: mrope_section must be "
                             f"({text.head_dim // 2},), got {text.mrope_section}")
        if vision.hidden_size % vision.num_attention_heads:
            raise InputError("vision_config.hidden_size must be divisible by num_attention_heads")
        if vision.image_size % vision.patch_size:
            raise InputError(f"vision_config.image_size {vision.image_size} must be a multiple "
                             f"of patch_size {vision.patch_size}")
        if vision.norm_type not in ("layer_norm", "rms_norm"):
            raise InputError(f"vision_config.norm_type {vision.norm_type!r}: use layer_norm or "
                             "rms_norm")
        activation(vision.hidden_act)
        activation(self.projector_hidden_act)
        fold = self.shuffle_factor
        if vision.grid % fold:
            raise InputError(f"a tile's {vision.grid} patches per side must be a multiple of "
                             f"1 / downsample_ratio = {fold}")
        depth = vision.num_hidden_layers
        if not -depth - 1 <= self.vision_feature_layer <= depth:
            raise InputError(f"vision_feature_layer {self.vision_feature_layer} is outside the "
                             f"tower's {depth + 1} hidden states")
        if self.image_seq_length != self.tokens_per_tile:
            raise InputError(
                f"image_seq_length {self.image_seq_length} disagrees with the geometry: "
                f"({vision.image_size} / {vision.patch_size} * {self.downsample_ratio})^2 = "
                f"{self.tokens_per_tile} tokens per tile")

    @property
    def shuffle_factor(self) -> int:
        """Patches per side folded into one token by the pixel shuffle (2 for ratio 0.5)."""
        fold = round(1 / self.downsample_ratio)
        if fold < 1 or not math.isclose(fold * self.downsample_ratio, 1.0):
            raise InputError(f"downsample_ratio {self.downsample_ratio} must be 1 / an integer")
        return fold

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision.grid // self.shuffle_factor) ** 2

    @property
    def vision_layers_run(self) -> int:
        """How many tower layers `vision_feature_layer` needs (the later ones are skipped)."""
        layer, depth = self.vision_feature_layer, self.vision.num_hidden_layers
        return layer if layer >= 0 else depth + 1 + layer

    def replace(self, **changes) -> InternVLConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **runtime) -> InternVLConfig:
        """From transformers' native InternVL config.json (vision_config and text_config nested).
        Fields a saved config may omit take transformers' class defaults."""
        model_type = hf.get("model_type")
        if model_type != "internvl":
            raise InputError(
                f"config.json describes model_type={model_type!r}; InternVLConfig reads "
                "transformers' native InternVL (model_type 'internvl'). A remote-code "
                "'internvl_chat' checkpoint must first be converted (transformers' "
                "convert_internvl_weights_to_hf.py), or use an OpenGVLab '*-hf' repository")
        text = hf.get("text_config")
        vision = hf.get("vision_config")
        if not isinstance(text, Mapping) or not isinstance(vision, Mapping):
            raise InputError("config.json needs both text_config and vision_config objects")
        text_kwargs, rope_type, rope_factor = _text_from_hf(text)
        strategy = hf.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise InputError(f"vision_feature_select_strategy {strategy!r} is not supported "
                             "(only 'default': the cls token is dropped)")
        feature_layer = hf.get("vision_feature_layer", -1)
        if not isinstance(feature_layer, int):
            raise InputError(f"vision_feature_layer {feature_layer!r}: only one layer index is "
                             "supported, not a list")
        ids = {}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = text.get(k, hf.get(k))
            ids[k] = tuple(value) if isinstance(value, list) else value
        top = {k: hf[k] for k in ("image_token_id", "image_seq_length", "downsample_ratio",
                                  "projector_hidden_act") if k in hf}
        return cls(
            vision=_vision_from_hf(vision),
            text=TextConfig(**text_kwargs),
            text_model_type=text["model_type"],
            rope_type=rope_type,
            rope_factor=rope_factor,
            vision_feature_layer=feature_layer,
            # The top-level flag decides (transformers ignores text_config's for this model).
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            **top, **ids, **runtime,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers loads as InternVLForConditionalGeneration."""
        t, v = self.text, self.vision
        rope = {"rope_type": self.rope_type, "rope_theta": t.rope_theta}
        if self.rope_type == "dynamic":
            rope["factor"] = self.rope_factor
        text = {
            "model_type": self.text_model_type, "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
            "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": rope, "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.text_model_type == "llama":
            text.update(attention_bias=t.attention_bias, mlp_bias=False, head_dim=t.head_dim)
        else:
            text.update(use_sliding_window=False)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, k)
            text[k] = list(value) if isinstance(value, tuple) else value
        vision = dataclasses.asdict(v)
        vision.update(model_type="internvl_vision", image_size=[v.image_size] * 2,
                      patch_size=[v.patch_size] * 2)
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "image_seq_length": self.image_seq_length,
            "downsample_ratio": self.downsample_ratio,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
        }


def _square(value, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise InputError(f"vision_config.{field} {value}: only square tiles are supported")
        value = value[0]
    return int(value)


def _vision_from_hf(vision: Mapping[str, Any]) -> InternViTConfig:
    fields = {f.name for f in dataclasses.fields(InternViTConfig)}
    kwargs = {k: v for k, v in vision.items() if k in fields}
    for field in ("image_size", "patch_size"):
        if field in kwargs:
            kwargs[field] = _square(kwargs[field], field)
    if vision.get("use_mask_token"):
        raise InputError("vision_config.use_mask_token=true (masked image modelling) is not "
                         "supported")
    return InternViTConfig(**kwargs)


# Shape-defining text fields: a config.json without them describes no particular model.
_REQUIRED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
# transformers' Qwen2Config / LlamaConfig defaults for the fields a saved config may omit.
_TEXT_DEFAULTS = {
    "qwen2": {"rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 32768,
              "rope_theta": 10000.0},
    "llama": {"rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 2048,
              "rope_theta": 10000.0},
}


def _text_from_hf(text: Mapping[str, Any]) -> tuple[dict[str, Any], str, float]:
    """TextConfig fields, rope type and factor from a qwen2 or llama text_config."""
    model_type = text.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        raise InputError(f"text_config.model_type {model_type!r} is not supported: InternVL's "
                         f"language model must be one of {TEXT_MODEL_TYPES} (InternVL2.5 uses "
                         "Qwen2.5, or InternLM2.5 converted to llama)")
    missing = [k for k in _REQUIRED_TEXT if k not in text]
    if missing:
        raise InputError(f"text_config lacks {missing}")
    defaults = _TEXT_DEFAULTS[model_type]
    if model_type == "qwen2" and text.get("use_sliding_window"):
        raise InputError("text_config.use_sliding_window=true is not supported")
    if model_type == "llama" and text.get("mlp_bias"):
        raise InputError("text_config.mlp_bias=true is not supported")
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    if head_dim * heads != text["hidden_size"]:
        raise InputError(f"text_config.head_dim {head_dim} x num_attention_heads {heads} must "
                         f"equal hidden_size {text['hidden_size']}")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise InputError(f"text_config.rope_parameters.rope_type {rope_type!r} is not supported "
                         f"(supported: {ROPE_TYPES})")
    rope_theta = rope.get("rope_theta", text.get("rope_theta", defaults["rope_theta"]))
    kwargs = {k: text[k] for k in _REQUIRED_TEXT}
    kwargs.update(
        num_key_value_heads=text.get("num_key_value_heads") or heads,
        rms_norm_eps=text.get("rms_norm_eps", defaults["rms_norm_eps"]),
        hidden_act=text.get("hidden_act", defaults["hidden_act"]),
        max_position_embeddings=text.get("max_position_embeddings",
                                         defaults["max_position_embeddings"]),
        rope_theta=float(rope_theta),
        mrope_section=(head_dim // 2,),
        # Qwen2: q/k/v biases only; Llama's attention_bias: q/k/v and o_proj (InternLM2 "bias").
        attention_bias=model_type == "qwen2" or bool(text.get("attention_bias", False)),
        o_proj_bias=model_type == "llama" and bool(text.get("attention_bias", False)),
    )
    return kwargs, rope_type, float(rope.get("factor", 1.0))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class InternVisionInputs:
    """Each batch row's image tiles, padded to a tile budget I (see the module docstring)."""

    pixels_BxIxCxSxS: jax.Array  # float normalised pixels, S = the tile side (image_size)
    tile_valid_BxI: jax.Array  # bool: False on padding tiles


# ---------------------------------------------------------------------------------------------
# Vision tower (InternViT)
# ---------------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (weight and bias); statistics in float32 whatever the compute dtype."""

    def __init__(self, dim: int, eps: float, config: InternVLConfig):
        dtype = DTYPES[config.param_dtype]
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.scale[...] + self.bias[...]).astype(x.dtype)


def _norm(config: InternVLConfig):
    vision = config.vision
    if vision.norm_type == "layer_norm":
        return LayerNorm(vision.hidden_size, vision.layer_norm_eps, config)
    return RMSNorm(vision.hidden_size, vision.layer_norm_eps, config)


class VisionAttention(nnx.Module):
    """Full bidirectional attention over one tile's cls token and patches; the QK norms (when
    configured) normalise over all heads together, before the heads are split."""

    def __init__(self, config: InternVLConfig, rngs: nnx.Rngs):
        vision = config.vision
        d = vision.hidden_size
        self.num_heads = vision.num_attention_heads
        self.attention_impl = config.attention_impl
        kw = dict(config=config, rngs=rngs)
        axes = ("vision_embed", "vision_qkv")
        self.q_proj = Dense(d, d, axes, use_bias=vision.attention_bias, **kw)
        self.k_proj = Dense(d, d, axes, use_bias=vision.attention_bias, **kw)
        self.v_proj = Dense(d, d, axes, use_bias=vision.attention_bias, **kw)
        self.projection_layer = Dense(d, d, ("vision_qkv", "vision_embed"), use_bias=True, **kw)
        self.q_norm = RMSNorm(d, QK_NORM_EPS, config) if vision.use_qk_norm else None
        self.k_norm = RMSNorm(d, QK_NORM_EPS, config) if vision.use_qk_norm else None

    def __call__(self, x_BxPxD):
        b, p, d = x_BxPxD.shape
        q, k, v = self.q_proj(x_BxPxD), self.k_proj(x_BxPxD), self.v_proj(x_BxPxD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        n = self.num_heads
        heads = (b, p, n, d // n)
        out_BxPxNxH = attention.attention(q.reshape(heads), k.reshape(heads), v.reshape(heads),
                                          causal=False, implementation=self.attention_impl)
        return self.projection_layer(out_BxPxNxH.reshape(b, p, d))


class VisionMLP(nnx.Module):
    def __init__(self, config: InternVLConfig, rngs: nnx.Rngs):
        vision = config.vision
        kw = dict(use_bias=True, config=config, rngs=rngs)
        self.fc1 = Dense(vision.hidden_size, vision.intermediate_size,
                         ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Dense(vision.intermediate_size, vision.hidden_size,
                         ("vision_mlp", "vision_embed"), **kw)
        self.act = activation(vision.hidden_act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nnx.Module):
    """Pre-norm block whose two residual branches are scaled per channel (layer scale)."""

    def __init__(self, config: InternVLConfig, rngs: nnx.Rngs):
        vision = config.vision
        dtype = DTYPES[config.param_dtype]
        self.layernorm_before = _norm(config)
        self.attention = VisionAttention(config, rngs)
        self.layernorm_after = _norm(config)
        self.mlp = VisionMLP(config, rngs)
        init = jnp.full((vision.hidden_size,), vision.layer_scale_init_value, dtype)
        self.lambda_1 = nnx.Param(init, logical_axes=("norm",))
        self.lambda_2 = nnx.Param(init, logical_axes=("norm",))

    def __call__(self, x_BxPxD):
        dtype = x_BxPxD.dtype
        x_BxPxD = x_BxPxD + self.lambda_1[...].astype(dtype) * self.attention(
            self.layernorm_before(x_BxPxD))
        x_BxPxD = x_BxPxD + self.lambda_2[...].astype(dtype) * self.mlp(
            self.layernorm_after(x_BxPxD))
        return constrain(x_BxPxD, ("batch", "length", "act_embed"))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] weights of PyTorch's 1-D bicubic resampling (align_corners=False, A = -0.75,
    edge indices clamped); the 2-D interpolation of a [in, in] grid is W @ grid @ W.T."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    for o in range(size_out):
        source = (o + 0.5) * scale - 0.5
        base = math.floor(source)
        t = source - base
        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t)),
                             strict=True):
            weights[o, min(max(base + offset, 0), size_in - 1)] += w
    return weights.astype(np.float32)


class VisionTower(nnx.Module):
    """Tiles [n, C, S, S] -> hidden states [n, 1 + P, D] (cls token first) after the layers
    `vision_feature_layer` selects."""

    def __init__(self, config: InternVLConfig, rngs: nnx.Rngs):
        vision = config.vision
        dtype = DTYPES[config.param_dtype]
        self.config = vision
        self.layers_run = config.vision_layers_run
        self.final_norm = (config.vision_feature_layer == -1 and not vision.use_mean_pooling)
        self.dtype = DTYPES[config.compute_dtype]
        # Conv2d with stride == kernel over (C, p, p) patches is a matmul (with a bias here).
        self.patch_embed = Dense(vision.patch_features, vision.hidden_size,
                                 ("patch", "vision_embed"), use_bias=True, config=config,
                                 rngs=rngs)
        # Zero-initialised in transformers; kept in its [1, 1, D] / [1, 1 + P, D] shapes.
        self.cls_token = nnx.Param(jnp.zeros((1, 1, vision.hidden_size), dtype),
                                   logical_axes=(None, None, "vision_embed"))
        self.position_embeddings = (
            nnx.Param(jnp.zeros((1, 1 + vision.grid**2, vision.hidden_size), dtype),
                      logical_axes=(None, None, "vision_embed"))
            if vision.use_absolute_position_embeddings else None)
        self.layers = stacked(lambda rngs: VisionLayer(config, rngs), vision.num_hidden_layers,
                              rngs)
        self.layernorm = (LayerNorm(vision.hidden_size, vision.layer_norm_eps, config)
                          if self.final_norm else None)

    def _positions(self, grid: int):
        """[1 + P, D] position embedding for a tile of grid x grid patches: the trained one, or
        its bicubic resampling (the cls entry unchanged) as transformers interpolates it."""
        table = self.position_embeddings[...][0].astype(self.dtype)
        trained = self.config.grid
        if grid == trained:
            return table
        w_out_in = jnp.asarray(bicubic_matrix(trained, grid), self.dtype)
        precision = matmul_precision(self.dtype)

        def resample_rows(x_in_in_d):  # [rows, cols, D] -> [cols, new rows, D]
            rows, cols, d = x_in_in_d.shape
            out = jnp.matmul(w_out_in, x_in_in_d.reshape(rows, cols * d), precision=precision)
            return out.reshape(grid, cols, d).transpose(1, 0, 2)

        both = resample_rows(resample_rows(table[1:].reshape(trained, trained, -1)))
        return jnp.concatenate([table[:1], both.reshape(grid * grid, -1)], axis=0)

    def __call__(self, tiles_BxCxSxS):
        b, c, s, _ = tiles_BxCxSxS.shape
        p = self.config.patch_size
        grid = s // p
        patches_BxPxC = tiles_BxCxSxS.reshape(b, c, grid, p, grid, p).transpose(
            0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c * p * p)
        x_BxPxD = self.patch_embed(patches_BxPxC.astype(self.dtype))
        cls_BxD = jnp.broadcast_to(self.cls_token[...][0].astype(self.dtype),
                                   (b, x_BxPxD.shape[-1]))
        x_BxPxD = jnp.concatenate([cls_BxD[:, None], x_BxPxD], axis=1)
        if self.position_embeddings is not None:
            x_BxPxD = x_BxPxD + self._positions(grid)
        x_BxPxD = constrain(x_BxPxD, ("batch", "length", "act_embed"))
        layers = self.layers
        if self.layers_run < self.config.num_hidden_layers:
            graphdef, state = nnx.split(layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:self.layers_run], state))
        if self.layers_run:
            x_BxPxD, _ = scan_layers(layers, lambda layer, x, _: (layer(x), None), x_BxPxD)
        return x_BxPxD if self.layernorm is None else self.layernorm(x_BxPxD)


def pixel_shuffle(x_BxPxD, fold: int):
    """[n, g*g, D] patches (row-major) -> [n, (g/f)^2, f*f*D] tokens: token (r, c) concatenates
    patches (f*r + i, f*c + j) in (i, j) order, the layout transformers' pixel_shuffle makes."""
    b, p, d = x_BxPxD.shape
    grid = math.isqrt(p)
    out = grid // fold
    x = x_BxPxD.reshape(b, out, fold, out, fold, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, out * out, fold * fold * d)


class Projector(nnx.Module):
    """LayerNorm, Linear, activation, Linear: pixel-shuffled vision tokens -> text width."""

    def __init__(self, config: InternVLConfig, rngs: nnx.Rngs):
        width = config.vision.hidden_size * config.shuffle_factor**2
        d = config.text.hidden_size
        kw = dict(use_bias=True, config=config, rngs=rngs)
        self.layer_norm = LayerNorm(width, PROJECTOR_NORM_EPS, config)
        # The decoder MLP's pattern (in over fsdp then out over tensor, then back): with
        # linear_1's output over fsdp, which the batch axis also uses, XLA's SPMD partitioner
        # (jax 0.10.2, CPU) swapped whole tiles between batch shards.
        self.linear_1 = Dense(width, d, ("vision_embed", "mlp"), **kw)
        self.linear_2 = Dense(d, d, ("mlp", "embed"), **kw)
        self.act = activation(config.projector_hidden_act)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class InternVL(CausalLM):
    """InternVLForConditionalGeneration: InternViT, projector, decoder, (tied or untied) head.
    The language model's methods (embed, decode, decode_step, logits, __call__) are
    CausalLM's (models/decoder.py); only the rotary differs (dynamic NTK's range check)."""

    def __init__(self, config: InternVLConfig, rngs: nnx.Rngs):
        self.vision_tower = VisionTower(config, rngs)
        self.multi_modal_projector = Projector(config, rngs)
        self.init_language_model(config, rngs)

    def encode_images(self, vision: InternVisionInputs) -> jax.Array:
        """Vision tokens [B, I * tokens_per_tile, D] of every row's tiles, in tile order."""
        b, i, c, s, _ = vision.pixels_BxIxCxSxS.shape
        unit = self.config.vision.patch_size * self.config.shuffle_factor
        if s % unit:
            raise InputError(f"tiles of {s} px: the side must be a multiple of patch_size x "
                             f"1 / downsample_ratio = {unit} px")
        # Padding tiles are zeroed: whatever the host left there cannot reach a gradient.
        pixels = jnp.where(vision.tile_valid_BxI[:, :, None, None, None],
                           vision.pixels_BxIxCxSxS, 0).reshape(b * i, c, s, s)
        hidden_BxPxD = self.vision_tower(constrain(pixels, ("batch", None, None, None)))
        tokens = pixel_shuffle(hidden_BxPxD[:, 1:], self.config.shuffle_factor)
        features = self.multi_modal_projector(tokens)
        features_BxMxD = constrain(features.reshape(b, -1, features.shape[-1]),
                                   ("batch", "length", "act_embed"))
        if self.config.freeze_vision:
            features_BxMxD = jax.lax.stop_gradient(features_BxMxD)
        return features_BxMxD

    def _rotary(self, positions_3xBxT):
        text = self.config.text
        length = positions_3xBxT.shape[-1]
        if self.config.rope_type == "dynamic" and length > text.max_position_embeddings:
            # Dynamic NTK equals the default rotary up to max_position_embeddings and rescales
            # the frequencies beyond it, per sequence; that part is not ported.
            raise InputError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{text.max_position_embeddings}, where dynamic rope scaling "
                             "changes the rotary frequencies: not supported")
        inv_freq = inverse_frequencies(text.rope_theta, text.head_dim)
        return mrope_cos_sin(positions_3xBxT, inv_freq, text.mrope_section)


def text_positions(attention_mask_BxT) -> np.ndarray:
    """int32 [3, B, T] positions for left-padded rows: 0..n-1 over the real tokens (0 on padding),
    the same in all three rows; transformers' generate computes them this way."""
    mask = np.asarray(attention_mask_BxT).astype(np.int64)
    positions_BxT = np.where(mask > 0, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)
    return np.broadcast_to(positions_BxT, (3, *positions_BxT.shape)).copy()
