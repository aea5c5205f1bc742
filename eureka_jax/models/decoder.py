"""The decoder-only language model both model families use (Qwen2.5-VL's, InternVL's): token
embeddings, a stack of pre-norm layers (grouped-query attention with rotary positions, SwiGLU MLP,
RMSNorm), a tied or untied head, and the KV cache the sampler decodes with; plus the building
blocks (Dense, RMSNorm, GatedMLP, rotary, layer stacking) the vision towers reuse.

`CausalLM` holds the language-model half of the method contract every family's model keeps
(eureka_jax/families): `embed`, `decode`, `text_rotary_table`, `decode_step`, `logits` and the
teacher-forced `__call__`; a model adds `encode_images` and builds its language model with
`init_language_model`. Rotary positions are [3, B, T] M-RoPE positions (models/qwen2_5_vl.py);
a 1-D rotary model (InternVL) uses one section of head_dim / 2 frequencies, which reads only the
first row.

Depth. The layers are one module whose parameters have a leading layer axis (logical name
"layers", never sharded; created by nnx.vmap) and run as one lax.scan, so a program's size and
compile time do not grow with the number of layers. `model.remat` puts jax.checkpoint around each
scanned layer; whatever it says, GatedMLP recomputes its elementwise part in the backward (its own
jax.checkpoint: gate and up are what it keeps). The KV cache is stacked the same way.

A config here is a family's model config: `.text` (TextConfig) and the runtime fields
param_dtype, compute_dtype, remat, attention_impl.

Einsum letters: B batch, T query length, S key length, N heads, K kv heads, G query heads per kv
head, H head dim, D model dim, F mlp dim, V vocab; in shape suffixes also Y layers (the scanned
axis), L generated tokens and M vision tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from eureka_jax import attention
from eureka_jax.errors import InputError
from eureka_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    # q/k/v projection biases: Qwen2 has them; a Llama decoder (InternVL, models/internvl.py)
    # follows its config's attention_bias, which also gives o_proj one (o_proj_bias).
    attention_bias: bool = True
    o_proj_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def check_runtime_fields(config) -> None:
    """InputError for a model config's runtime fields (the ones no checkpoint holds) that the
    decoder cannot run with: param/compute dtype, remat policy, logits chunk, attention backend."""
    for field in ("param_dtype", "compute_dtype"):
        if getattr(config, field) not in DTYPES:
            raise InputError(f"model.{field} must be one of {sorted(DTYPES)}")
    if config.remat not in REMAT_POLICIES:
        raise InputError(f"model.remat must be one of {sorted(REMAT_POLICIES)}")
    if config.logits_chunk < 0:
        raise InputError(f"model.logits_chunk must be >= 0 (got {config.logits_chunk})")
    attention.check_implementation(config.attention_impl)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return jax.random.normal(rngs.params(), shape, dtype) * std


def matmul_precision(dtype):
    # float32 compute must mean float32 matmuls on TPU too, where the default is one bf16 pass.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=name != "gelu")
    raise InputError(f"unsupported hidden_act {name!r}: use silu or gelu")


def project(x, kernel, *, kernel_in_axis: int = 0):
    """x [..., I] times a 2-D kernel ([I, O], or [O, I] with kernel_in_axis=1) -> [..., O], as
    one [rows, I] product over the leading axes merged.

    Why rows: with x kept [B, T, I], the kernel's gradient contracts two axes, and XLA:CPU
    transposed the [B, T, O] output gradient through memory before that product; a dense
    layer's backward ran 1.4x slower (tests/test_decoder.py checks the compiled backward has no
    transpose). Merging the leading axes is free and keeps their sharding: "length" is never
    sharded (sharding.DEFAULT_RULES), so the rows are split as the batch is."""
    rows = x.reshape(-1, x.shape[-1])
    y = jax.lax.dot_general(rows, kernel, (((1,), (kernel_in_axis,)), ((), ())),
                            precision=matmul_precision(x.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] (Hugging Face stores [out, in])."""

    def __init__(self, d_in, d_out, axes, *, use_bias, config, rngs: nnx.Rngs):
        param_dtype = DTYPES[config.param_dtype]
        self.kernel = nnx.Param(normal(rngs, (d_in, d_out), param_dtype), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((d_out,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )
        self.dtype = DTYPES[config.compute_dtype]

    def __call__(self, x):
        y = project(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, config):
        self.scale = nnx.Param(jnp.ones((dim,), DTYPES[config.param_dtype]), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        # Statistics in float32 whatever the compute dtype, as the reference does.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * normed.astype(x.dtype)).astype(x.dtype)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU, with biases in the vision tower only."""

    def __init__(self, d_model, d_ff, act, axes, *, use_bias, config, rngs):
        embed_axis, mlp_axis = axes
        self.gate_proj = Dense(d_model, d_ff, axes, use_bias=use_bias, config=config, rngs=rngs)
        self.up_proj = Dense(d_model, d_ff, axes, use_bias=use_bias, config=config, rngs=rngs)
        self.down_proj = Dense(
            d_ff, d_model, (mlp_axis, embed_axis), use_bias=use_bias, config=config, rngs=rngs
        )
        self.act = activation(act)

    def __call__(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)

        def down(gate, up):
            return self.down_proj(self.act(gate) * up)

        # The backward pass keeps gate and up only and recomputes the cheap elementwise part
        # (and the product it feeds the down projection): JAX would otherwise keep
        # sigmoid(gate), silu(gate) and the product too, five [B, T, mlp] arrays per layer
        # where two do (at 4096 tokens the difference is gigabytes; the recomputation is
        # elementwise work next to three matmuls).
        return jax.checkpoint(down)(gate, up)


def stacked(make_layer, count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` layers `make_layer(rngs)` as one module whose parameters have a leading layer axis
    (prepended to their logical axes as "layers"), each layer initialised from its own keys."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def make(rngs):
        return make_layer(rngs)

    return make(rngs)


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, remat: str = "none",
                unroll: int | bool = 1):
    """lax.scan of `body(layer, carry, x) -> (carry, y)` over a `stacked` module's layers (and
    the leading axis of `xs`); jax.checkpoint around each layer unless remat is "none"."""
    graphdef, state = nnx.split(layers)

    def step(carry, layer_xs):
        layer_state, x = layer_xs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat != "none":
        # prevent_cse=False: inside a scan there is nothing for CSE to merge across layers.
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs), unroll=unroll)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotary embedding in float32, cast back; cos/sin broadcast over the heads axis."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)


def inverse_frequencies(theta: float, dim: int) -> jax.Array:
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return jnp.asarray(1.0 / (np.float32(theta) ** exponents), jnp.float32)


def mrope_cos_sin(positions_3xBxT, inv_freq, mrope_section):
    """M-RoPE: rotary frequency j uses the temporal, height or width position by mrope_section."""
    freqs_3xBxTxJ = positions_3xBxT.astype(jnp.float32)[..., None] * inv_freq
    section_of = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
    select_3xJ = jnp.asarray(np.arange(3)[:, None] == section_of[None, :], jnp.float32)
    freqs_BxTxJ = jnp.sum(freqs_3xBxTxJ * select_3xJ[:, None, None, :], axis=0)
    freqs_BxTxH = jnp.concatenate([freqs_BxTxJ, freqs_BxTxJ], axis=-1)
    return jnp.cos(freqs_BxTxH), jnp.sin(freqs_BxTxH)


def masked_softmax(scores, mask):
    # A finite fill value keeps fully-masked rows (left padding) finite, as the reference does.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class LayerKV:
    """The cache's keys and values: in `KVCache` every array has a leading layer axis [Y, ...]
    (Y decoder layers); the decoding scan hands one layer's slice to a layer. Keys are stored
    transposed ([.., H, S]) so that q . k is a plain [G, H] x [H, S] product per row and kv head
    and a decoding step never changes the cache's layout (XLA otherwise transposes the whole
    cache every step, which on CPU cost more than the attention itself)."""

    prompt_k: jax.Array  # [(Y,) P, K, H, T]: the prompt's keys, once per prompt
    prompt_v: jax.Array  # [(Y,) P, K, T, H]
    gen_k: jax.Array  # [(Y,) N, K, H, L]: generated tokens' keys, once per sample
    gen_v: jax.Array  # [(Y,) N, K, L, H]


@struct.dataclass
class KVCache:
    """Decoding cache for P prompts x G samples each (N = P*G rows, prompt-major).

    The G samples of a group share their prompt, so the prompt's keys and values are stored once
    per prompt and read once per group (a GRPO prompt with an image is ~1k tokens; G copies of it
    would dominate the cache), while each sample's generated tokens go to its own slots: gen slot
    i holds the i-th generated token fed back to the model.
    """

    layers: LayerKV  # every layer's keys and values, stacked: [Y, ...] each
    prompt_valid_PxT: jax.Array  # bool: False on left padding

    @classmethod
    def from_prompt(cls, prompt_kv, prompt_valid_PxT, group: int, max_new: int) -> KVCache:
        """The cache after a prefill: `prompt_kv` is (k, v), [Y, P, T, K, H] each, as
        `Qwen25VL.decode` returns them; room for `max_new` generated tokens per sample."""
        k_YxPxTxKxH, v_YxPxTxKxH = prompt_kv
        y, p, _, k, h = k_YxPxTxKxH.shape
        n = p * group
        layers = LayerKV(
            prompt_k=constrain(k_YxPxTxKxH.transpose(0, 1, 3, 4, 2), CACHE_K_AXES),
            prompt_v=constrain(v_YxPxTxKxH.transpose(0, 1, 3, 2, 4), CACHE_V_AXES),
            gen_k=constrain(jnp.zeros((y, n, k, h, max_new), k_YxPxTxKxH.dtype), CACHE_K_AXES),
            gen_v=constrain(jnp.zeros((y, n, k, max_new, h), v_YxPxTxKxH.dtype), CACHE_V_AXES),
        )
        return cls(layers=layers, prompt_valid_PxT=prompt_valid_PxT.astype(bool))

    @property
    def gen_length(self) -> int:
        return self.layers.gen_k.shape[-1]

    def readable_NxS(self, gen_slot) -> jax.Array:
        """bool [N, T + L]: the keys a decoding step writing at `gen_slot` may read, the same in
        every layer: its group's prompt without the left padding, then generated slots
        0..gen_slot."""
        n, length = self.layers.gen_k.shape[1], self.gen_length
        group = n // self.prompt_valid_PxT.shape[0]
        return jnp.concatenate([jnp.repeat(self.prompt_valid_PxT, group, axis=0),
                                jnp.broadcast_to(jnp.arange(length) <= gen_slot, (n, length))],
                               axis=1)

    def grow(self, length: int) -> KVCache:
        """The same cache with room for `length` generated tokens (the new slots zero). A copy:
        until it completes, the old and the new generated buffers are both in memory."""
        extra = length - self.gen_length
        if extra < 0:
            raise ValueError(f"cannot shrink the generated buffer ({self.gen_length} -> {length})")
        if extra == 0:
            return self

        def pad(x, axis, axes):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, extra)
            return constrain(jnp.pad(x, widths), axes)

        kv = self.layers
        return self.replace(layers=kv.replace(gen_k=pad(kv.gen_k, 4, CACHE_K_AXES),
                                              gen_v=pad(kv.gen_v, 3, CACHE_V_AXES)))


CACHE_K_AXES = ("layers", "batch", "act_kv_heads", "head_dim", "cache_length")
CACHE_V_AXES = ("layers", "batch", "act_kv_heads", "cache_length", "head_dim")


# ---------------------------------------------------------------------------------------------
# Decoder layers
# ---------------------------------------------------------------------------------------------


def _decode_attention(q_NxKxGxH, kv: LayerKV, readable_NxS):
    """One query token per sample against its group's prompt and its own generated slots (the
    `readable_NxS` ones, see KVCache.readable_NxS), with one softmax over both (the teacher-forced
    forward's arithmetic). The prompt
    part is one product per prompt for all G samples of its group. The whole generated buffer is
    read: the sampler grows it in phases so that it stays close to the filled length."""
    n, k, g, h = q_NxKxGxH.shape
    p, _, _, t = kv.prompt_k.shape
    precision = matmul_precision(q_NxKxGxH.dtype)

    def scores_of(spec, query, keys):
        return jnp.einsum(spec, query, keys, preferred_element_type=jnp.float32,
                          precision=precision) * (h**-0.5)

    # The prompt products take float32 operands (exact for bfloat16 values, so the same
    # arithmetic as bfloat16 operands with float32 accumulation): XLA:CPU has no kernel for a
    # bfloat16 x bfloat16 -> float32 batched dot once the layer's cache is a slice of the
    # stacked one, and on TPU the convert fuses into the dot.
    prompt_k, prompt_v = kv.prompt_k.astype(jnp.float32), kv.prompt_v.astype(jnp.float32)
    prompt_scores_PxRxKxGxT = scores_of(
        "prkgh,pkht->prkgt", q_NxKxGxH.reshape(p, n // p, k, g, h).astype(jnp.float32), prompt_k)
    scores_NxKxGxS = jnp.concatenate(
        [prompt_scores_PxRxKxGxT.reshape(n, k, g, t),
         scores_of("nkgh,nkhl->nkgl", q_NxKxGxH, kv.gen_k)], axis=-1)
    probs = masked_softmax(scores_NxKxGxS, readable_NxS[:, None, None, :]).astype(kv.gen_v.dtype)
    prompt_out = jnp.einsum("prkgt,pkth->prkgh",
                            probs[..., :t].reshape(p, n // p, k, g, t).astype(jnp.float32),
                            prompt_v, preferred_element_type=jnp.float32, precision=precision)
    gen_out = jnp.einsum("nkgl,nklh->nkgh", probs[..., t:], kv.gen_v,
                         preferred_element_type=jnp.float32, precision=precision)
    return (prompt_out.reshape(n, k, g, h) + gen_out).astype(q_NxKxGxH.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with q/k/v biases (TextConfig.attention_bias) and M-RoPE; a full
    causal pass (teacher forcing, prefill) or one decoding step against a KVCache."""

    def __init__(self, config, rngs: nnx.Rngs):
        text = config.text
        d, h = text.hidden_size, text.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            text.num_attention_heads, text.num_key_value_heads, h,
        )
        self.attention_impl = config.attention_impl
        kw = dict(config=config, rngs=rngs)
        bias = text.attention_bias
        self.q_proj = Dense(d, self.num_heads * h, ("embed", "heads"), use_bias=bias, **kw)
        self.k_proj = Dense(d, self.num_kv_heads * h, ("embed", "kv_heads"), use_bias=bias, **kw)
        self.v_proj = Dense(d, self.num_kv_heads * h, ("embed", "kv_heads"), use_bias=bias, **kw)
        self.o_proj = Dense(self.num_heads * h, d, ("heads", "embed"), use_bias=text.o_proj_bias,
                            **kw)

    def _project(self, x_BxTxD, cos, sin):
        b, t, _ = x_BxTxD.shape
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q_BxTxNxH = apply_rotary(self.q_proj(x_BxTxD).reshape(b, t, n, h), cos, sin)
        q_BxTxNxH = constrain(q_BxTxNxH, ("batch", "length", "act_heads", "head_dim"))
        k_BxTxKxH = apply_rotary(self.k_proj(x_BxTxD).reshape(b, t, k, h), cos, sin)
        v_BxTxKxH = self.v_proj(x_BxTxD).reshape(b, t, k, h)
        return q_BxTxNxH.reshape(b, t, k, n // k, h), k_BxTxKxH, v_BxTxKxH

    def __call__(self, x_BxTxD, cos, sin, kv_valid_BxT):
        """Causal self-attention over the T inputs; also returns their (k, v) for a cache."""
        b, t, _ = x_BxTxD.shape
        q_BxTxKxGxH, k_BxTxKxH, v_BxTxKxH = self._project(x_BxTxD, cos, sin)
        out_BxTxNxH = attention.attention(
            q_BxTxKxGxH.reshape(b, t, self.num_heads, self.head_dim), k_BxTxKxH, v_BxTxKxH,
            causal=True, kv_valid_BxS=kv_valid_BxT, implementation=self.attention_impl)
        return self.o_proj(out_BxTxNxH.reshape(b, t, -1)), (k_BxTxKxH, v_BxTxKxH)

    def step(self, x_Nx1xD, cos, sin, kv: LayerKV, readable_NxS, gen_slot):
        """One token per sample: attend with its (k, v) at gen_slot of this layer's cache;
        returns the output and the token's (k [N, K, H, 1], v [N, K, 1, H]) for the cache."""
        n = x_Nx1xD.shape[0]
        q_Nx1xKxGxH, k_Nx1xKxH, v_Nx1xKxH = self._project(x_Nx1xD, cos, sin)
        new_k_NxKxHx1 = k_Nx1xKxH.transpose(0, 2, 3, 1).astype(kv.gen_k.dtype)
        new_v_NxKx1xH = v_Nx1xKxH.transpose(0, 2, 1, 3).astype(kv.gen_v.dtype)
        kv = kv.replace(
            gen_k=jax.lax.dynamic_update_slice(kv.gen_k, new_k_NxKxHx1, (0, 0, 0, gen_slot)),
            gen_v=jax.lax.dynamic_update_slice(kv.gen_v, new_v_NxKx1xH, (0, 0, gen_slot, 0)),
        )
        out_NxKxGxH = _decode_attention(q_Nx1xKxGxH[:, 0], kv, readable_NxS)
        return self.o_proj(out_NxKxGxH.reshape(n, 1, -1)), (new_k_NxKxHx1, new_v_NxKx1xH)


class DecoderLayer(nnx.Module):
    def __init__(self, config, rngs: nnx.Rngs):
        text = config.text
        self.input_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps, config)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps, config)
        self.self_attn = Attention(config, rngs)
        self.mlp = GatedMLP(
            text.hidden_size, text.intermediate_size, text.hidden_act, ("embed", "mlp"),
            use_bias=False, config=config, rngs=rngs,
        )

    def _finish(self, x_BxTxD, attn_out):
        x_BxTxD = x_BxTxD + attn_out
        x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
        return constrain(x_BxTxD, ("batch", "length", "act_embed"))

    def __call__(self, x_BxTxD, cos, sin, kv_valid_BxT):
        attn_out, kv = self.self_attn(self.input_layernorm(x_BxTxD), cos, sin, kv_valid_BxT)
        return self._finish(x_BxTxD, attn_out), kv

    def step(self, x_Nx1xD, cos, sin, kv: LayerKV, readable_NxS, gen_slot):
        attn_out, new_kv = self.self_attn.step(self.input_layernorm(x_Nx1xD), cos, sin, kv,
                                               readable_NxS, gen_slot)
        return self._finish(x_Nx1xD, attn_out), new_kv


# ---------------------------------------------------------------------------------------------
# The language model
# ---------------------------------------------------------------------------------------------


class CausalLM(nnx.Module):
    """The language-model half of a family's model: embeddings, decoder stack, head."""

    def init_language_model(self, config, rngs: nnx.Rngs):
        text = config.text
        self.config = config
        self.dtype = DTYPES[config.compute_dtype]
        self.embed_tokens = nnx.Param(
            normal(rngs, (text.vocab_size, text.hidden_size), DTYPES[config.param_dtype]),
            logical_axes=("vocab", "embed"),
        )
        self.layers = stacked(lambda rngs: DecoderLayer(config, rngs), text.num_hidden_layers,
                              rngs)
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps, config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Dense(text.hidden_size, text.vocab_size, ("embed", "vocab"), use_bias=False,
                       config=config, rngs=rngs)
        )

    def embed(self, input_ids_BxT, image_features_BxMxD=None, token_source_BxT=None):
        """Token embeddings with <|image_pad|> slots replaced by their merged vision tokens."""
        x_BxTxD = jnp.take(self.embed_tokens[...], input_ids_BxT, axis=0).astype(self.dtype)
        if image_features_BxMxD is not None:
            source = jnp.clip(token_source_BxT, 0, image_features_BxMxD.shape[1] - 1)
            gathered = jnp.take_along_axis(image_features_BxMxD, source[..., None], axis=1)
            x_BxTxD = jnp.where(token_source_BxT[..., None] >= 0, gathered.astype(self.dtype),
                                x_BxTxD)
        return constrain(x_BxTxD, ("batch", "length", "act_embed"))

    def decode(self, x_BxTxD, positions_3xBxT, kv_valid_BxT):
        """Decoder stack over T tokens, causal (teacher forcing, or a prefill). Returns the final
        hidden states and every layer's (k, v) [Y, B, T, K, H] for `KVCache.from_prompt` (a
        caller that drops them costs nothing: the scan's unused outputs are removed)."""
        cos, sin = self._rotary(positions_3xBxT)

        def layer_fn(layer, x_BxTxD, _):
            return layer(x_BxTxD, cos, sin, kv_valid_BxT)

        x_BxTxD, kv = scan_layers(self.layers, layer_fn, x_BxTxD, remat=self.config.remat)
        return self.norm(x_BxTxD), kv

    def text_rotary_table(self, length: int):
        """cos, sin [S, H] of text positions 0..length-1 (a text token's three M-RoPE components
        are equal). Decoding looks its angles up here: computed inside the step, XLA fuses cos/sin
        into every layer's and head's rotary and recomputes them there."""
        cos_1xSxH, sin_1xSxH = self._rotary(jnp.broadcast_to(jnp.arange(length), (3, 1, length)))
        return cos_1xSxH[0], sin_1xSxH[0]

    def layer_modules(self) -> list[DecoderLayer]:
        """The decoder layers as separate modules, each weight sliced out of the stacked ones
        here, once: what `decode_step(layers=...)` reads when a decoding loop is unrolled over
        the layers (a copy of the decoder's weights while it lives)."""
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda stacked, i=i: stacked[i], state))
                for i in range(self.config.text.num_hidden_layers)]

    def decode_step(self, x_Nx1xD, position_N, cache: KVCache, gen_slot, rotary_table,
                    layers: list[DecoderLayer] | None = None):
        """One generated (text) token per sample at `position_N` (below the length of
        `rotary_table`, from `text_rotary_table`), against the cache; written at generated slot
        `gen_slot`. The layers run as a scan over the stacked weights, or with `layers` (from
        `layer_modules`, made outside the decoding loop) unrolled over them."""
        cos_SxH, sin_SxH = rotary_table
        cos, sin = cos_SxH[position_N[:, None]], sin_SxH[position_N[:, None]]
        readable_NxS = cache.readable_NxS(gen_slot)  # once per step, not once per layer

        def layer_fn(layer, x_Nx1xD, kv):
            return layer.step(x_Nx1xD, cos, sin, kv, readable_NxS, gen_slot)

        if layers is None:
            x_Nx1xD, (new_k_YxNxKxHx1, new_v_YxNxKx1xH) = scan_layers(
                self.layers, layer_fn, x_Nx1xD, cache.layers)
        else:
            new_kv = []
            for i, layer in enumerate(layers):
                kv = jax.tree.map(lambda stacked, i=i: stacked[i], cache.layers)
                x_Nx1xD, kv = layer_fn(layer, x_Nx1xD, kv)
                new_kv.append(kv)
            new_k_YxNxKxHx1, new_v_YxNxKx1xH = (jnp.stack(parts)
                                                for parts in zip(*new_kv, strict=True))
        # Written once for all layers, in place: the scan reads the cache and writes no copy.
        kv = cache.layers
        kv = kv.replace(
            gen_k=jax.lax.dynamic_update_slice(kv.gen_k, new_k_YxNxKxHx1, (0, 0, 0, 0, gen_slot)),
            gen_v=jax.lax.dynamic_update_slice(kv.gen_v, new_v_YxNxKx1xH, (0, 0, 0, gen_slot, 0)))
        return self.norm(x_Nx1xD), cache.replace(layers=kv)

    def _rotary(self, positions_3xBxT):
        text = self.config.text
        inv_freq = inverse_frequencies(text.rope_theta, text.head_dim)
        return mrope_cos_sin(positions_3xBxT, inv_freq, text.mrope_section)

    def logits(self, hidden_BxTxD):
        if self.lm_head is not None:
            logits = self.lm_head(hidden_BxTxD)
        else:
            logits = project(hidden_BxTxD.astype(self.dtype),
                             self.embed_tokens[...].astype(self.dtype), kernel_in_axis=1)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids_BxT, positions_3xBxT, attention_mask_BxT,
                 vision=None, token_source_BxT=None):
        """Logits [B, T, V] for a (possibly left-padded) batch, no cache; `vision` is the
        family's vision inputs (None: text only)."""
        features = None if vision is None else self.encode_images(vision)
        x_BxTxD = self.embed(input_ids_BxT, features, token_source_BxT)
        hidden, _ = self.decode(x_BxTxD, positions_3xBxT, attention_mask_BxT.astype(bool))
        return self.logits(hidden)
