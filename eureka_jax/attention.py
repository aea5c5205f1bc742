"""Softmax self-attention over one sequence, without materialising [B, N, T, S] scores.

`attention` is the one entry point the model uses for a teacher-forced forward / prefill (causal,
left padding) and for the vision tower (segments = windows or images, padding). A decoding step
(one query against the KV cache) is not here: see `_decode_attention` in models/qwen2_5_vl.py.

Semantics, the same on every backend. Query t may attend to key s when
  kv_valid[b, s]                                    (False: padding)
  and segment_ids[b, t] == segment_ids[b, s] >= 0   (when given; -1 marks padding)
  and s <= t                                        (when causal)
  and |t - s| <= max_distance                       (when given; a static int).
A row with no key it may attend to (a left-padding position, a padding patch) returns the mean of
all S values, which is what the dense reference's fill with the lowest float32 gives (the model
never reads those rows; they only have to be finite). Scores are q.k / sqrt(H) in float32; with
float32 inputs every matmul uses Precision.HIGHEST, with bfloat16 inputs the matmuls take bfloat16
operands and accumulate in float32; softmax statistics are float32.

Backends (`implementation`; "auto" picks by jax.default_backend()):
  xla         chunked flash attention in plain XLA (CPU, and the fallback everywhere): query blocks
              in a scan, an online softmax over only the key chunks a block can see (causal: none
              above the diagonal; max_distance: only [start - d, end + d]); 16-bit inputs take a
              statistics pass first (see _flash_forward). A custom VJP recomputes the tiles, so
              training keeps O(T) memory, not the scan's per-tile residuals.
  pallas_tpu  the Pallas splash attention kernel (TPU): static causal / local mask, segment ids
              for validity and segments, GQA via kv heads; shard_map over batch and heads. Its
              in-kernel matmuls take no precision argument and accumulate in float32; whether
              float32 inputs get full-precision passes on a real TPU was not checked (tests run
              it in TPU interpret mode on CPU).
  cudnn       jax.nn.dot_product_attention(implementation="cudnn") (NVIDIA GPU, 16-bit only):
              the mask goes in as a [B, 1, T, S] boolean (that is O(B T S), not O(B N T S)).
              Never run here; "auto" picks it on any "gpu" backend, so on ROCm set "xla".
  dense       the materialised reference: [B, K, G, T, S] scores (tests, benchmarks, debugging).

Einsum letters: B batch, T query length (a query block in the chunked path), S key length (a key
chunk), N heads, K kv heads, G query heads per kv head (query head n = k * G + g), H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from eureka_jax import sharding
from eureka_jax.errors import InputError

IMPLEMENTATIONS = ("auto", "xla", "dense", "pallas_tpu", "cudnn")
# Default tiles. With a distance bound (vision windows) a query block of 128 sees one key chunk
# of 128 + 2 * bound; without one, 512 x 512 tiles keep the loop overhead small.
BLOCK = 512
BOUNDED_BLOCK_Q = 128
SPLASH_LANES = 128  # splash tiles are multiples of the TPU lane width
_MIN = float(jnp.finfo(jnp.float32).min)


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise InputError(f"attention implementation {implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}: fix model.attention_impl")
    return implementation


def resolve_implementation(implementation: str, dtype) -> str:
    """The backend "auto" means here: splash on TPU, cuDNN on GPU for 16-bit inputs, else XLA."""
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas_tpu"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, causal: bool, kv_valid_BxS=None,
              segment_ids_BxS=None, max_distance: int | None = None,
              implementation: str = "auto", block_q: int | None = None,
              block_k: int | None = None) -> jax.Array:
    """Self-attention of T queries over the same T positions (S == T); returns [B, T, N, H] in
    q's dtype. See the module docstring for the mask and the backends; block_q / block_k override
    the tile sizes of the xla and pallas_tpu backends."""
    b, t, n, h = q_BxTxNxH.shape
    _, s, kv_heads, _ = k_BxSxKxH.shape
    if s != t or v_BxSxKxH.shape != k_BxSxKxH.shape or n % kv_heads:
        raise ValueError(f"self-attention needs q [B, T, N, H] and k, v [B, T, K, H] with K | N; "
                         f"got {q_BxTxNxH.shape}, {k_BxSxKxH.shape}, {v_BxSxKxH.shape}")
    impl = resolve_implementation(implementation, q_BxTxNxH.dtype)
    k_BxSxKxH = k_BxSxKxH.astype(q_BxTxNxH.dtype)
    v_BxSxKxH = v_BxSxKxH.astype(q_BxTxNxH.dtype)
    q = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    valid_BxS = jnp.ones((b, s), bool) if kv_valid_BxS is None else kv_valid_BxS.astype(bool)
    segment_BxS = None if segment_ids_BxS is None else segment_ids_BxS.astype(jnp.int32)
    if segment_BxS is not None:
        valid_BxS = valid_BxS & (segment_BxS >= 0)
    mask = _Mask(causal, max_distance)
    if impl == "dense":
        out = _dense(q, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, mask)
        return out.reshape(b, t, n, h)
    if impl == "xla":
        tiling = _tiling(mask, t, block_q, block_k)
        out = _flash(q, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, tiling)
    elif impl == "pallas_tpu":
        out = _splash(q, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, mask, block_q, block_k)
    else:
        out = _dot_product_attention(q, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, mask,
                                     implementation="cudnn")
    return _fill_keyless_rows(out, v_BxSxKxH, _rows_with_keys(segment_BxS, valid_BxS, mask)
                              ).reshape(b, t, n, h)


# ---------------------------------------------------------------------------------------------
# The mask, shared by every backend
# ---------------------------------------------------------------------------------------------


class _Mask(NamedTuple):
    causal: bool
    max_distance: int | None


def _allowed(q_pos_T, k_pos_S, segment_q_BxT, segment_k_BxS, valid_k_BxS, mask: _Mask):
    """bool [B, T, S]: query position q_pos[t] may attend to key position k_pos[s]."""
    allowed = valid_k_BxS[:, None, :]
    if segment_q_BxT is not None:
        allowed = allowed & (segment_q_BxT[:, :, None] == segment_k_BxS[:, None, :])
    if mask.causal:
        allowed = allowed & (k_pos_S[None, :] <= q_pos_T[:, None])[None]
    if mask.max_distance is not None:
        distance = jnp.abs(q_pos_T[:, None] - k_pos_S[None, :])
        allowed = allowed & (distance <= mask.max_distance)[None]
    return allowed


def _rows_with_keys(segment_BxS, valid_BxS, mask: _Mask):
    """bool [B, T]: the query has at least one key. Tile by tile, over the tiles the chunked
    path visits (XLA does not fuse a [B, T, S] comparison into its reduction on CPU)."""
    b, t = valid_BxS.shape
    tiling = _tiling(mask, t, None, None)
    segments = None if segment_BxS is None else _split_blocks(segment_BxS, tiling.block_q, -1)

    def query_block(_, xs):
        index, segment_q = xs
        lo, chunks = _key_chunks(index, tiling, t)

        def key_chunk(j, has_BxT):
            allowed, _ = _chunk_mask(index, segment_q, segment_BxS, valid_BxS, lo, j, tiling)
            return has_BxT | allowed.any(-1)

        return None, lax.fori_loop(0, chunks, key_chunk, jnp.zeros((b, tiling.block_q), bool))

    _, has = lax.scan(query_block, None, (jnp.arange(-(-t // tiling.block_q)), segments))
    return _unblock(has, t)


def _fill_keyless_rows(out_BxTxKxGxH, v_BxSxKxH, has_key_BxT):
    mean_BxKxH = jnp.mean(v_BxSxKxH.astype(jnp.float32), axis=1).astype(out_BxTxKxGxH.dtype)
    return jnp.where(has_key_BxT[:, :, None, None, None], out_BxTxKxGxH,
                     mean_BxKxH[:, None, :, None, :])


def _precision(dtype):
    # float32 compute must mean float32 matmuls on TPU too, where the default is one bf16 pass.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _dot(spec, x, y):
    """einsum with float32 accumulation (and output); x's dtype picks the precision."""
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32,
                      precision=_precision(x.dtype))


# ---------------------------------------------------------------------------------------------
# dense: the materialised reference
# ---------------------------------------------------------------------------------------------


def _dense(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, mask: _Mask):
    h = q_BxTxKxGxH.shape[-1]
    positions = jnp.arange(q_BxTxKxGxH.shape[1])
    scores_BxKxGxTxS = _dot("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH) * (h**-0.5)
    allowed_BxTxS = _allowed(positions, positions, segment_BxS, segment_BxS, valid_BxS, mask)
    # A finite fill keeps rows without keys finite: they average all values.
    scores_BxKxGxTxS = jnp.where(allowed_BxTxS[:, None, None], scores_BxKxGxTxS, _MIN)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH,
                      precision=_precision(v_BxSxKxH.dtype))


# ---------------------------------------------------------------------------------------------
# xla: chunked flash attention
# ---------------------------------------------------------------------------------------------


class _Tiling(NamedTuple):
    mask: _Mask
    block_q: int
    block_k: int


def _tiling(mask: _Mask, t: int, block_q: int | None, block_k: int | None) -> _Tiling:
    bounded = mask.max_distance is not None
    bq = block_q or (BOUNDED_BLOCK_Q if bounded else BLOCK)
    bk = block_k or (bq + 2 * mask.max_distance if bounded else BLOCK)
    if bq < 1 or bk < 1:
        raise InputError(f"attention blocks must be positive, got block_q={bq} block_k={bk}")
    return _Tiling(mask, min(bq, t), min(bk, t))


def _key_chunks(i, tiling: _Tiling, s: int):
    """First key position and number of key chunks that query block i can see."""
    bq, bk = tiling.block_q, tiling.block_k
    start = i * bq
    lo, hi = 0, s
    if tiling.mask.max_distance is not None:
        lo = jnp.maximum(start - tiling.mask.max_distance, 0)
        hi = jnp.minimum(start + bq + tiling.mask.max_distance, s)
    if tiling.mask.causal:
        hi = jnp.minimum(hi, start + bq)
    return lo, (hi - lo + bk - 1) // bk


def _key_chunk(x_BxSx, lo, j, bk: int):
    """Key chunk j of a block's range, [lo + j*bk, lo + (j+1)*bk), read as an in-bounds slice:
    near the end the slice starts earlier, and `fresh` marks the keys the previous chunk has
    not seen (the others are masked)."""
    s = x_BxSx.shape[1]
    want = lo + j * bk
    start = jnp.minimum(want, s - bk)
    positions = start + jnp.arange(bk)
    return start, positions, positions >= want


class _Block(NamedTuple):
    """One query block's inputs: its index, q [B, T, K, G, H] and segment ids [B, T]."""

    index: jax.Array
    q: jax.Array
    segment: jax.Array | None


def _chunk_mask(index, segment_q_BxT, segment_BxS, valid_BxS, lo, j, tiling: _Tiling):
    """The mask [B, T, S] of query block `index` against its key chunk j, and the chunk's
    first key position."""
    bq, bk = tiling.block_q, tiling.block_k
    s = valid_BxS.shape[1]
    start, k_pos, fresh = _key_chunk(valid_BxS, lo, j, bk)

    def chunk(x):
        return lax.dynamic_slice_in_dim(x, start, bk, axis=1)

    segment_k = None if segment_BxS is None else chunk(segment_BxS)
    q_pos = index * bq + jnp.arange(bq)
    allowed_BxTxS = _allowed(q_pos, k_pos, segment_q_BxT, segment_k, chunk(valid_BxS) & fresh,
                             tiling.mask)
    # The queries padding the last block see nothing: no exp overflow in their backward.
    return allowed_BxTxS & (q_pos < s)[None, :, None], start


def _chunk_scores(block: _Block, k_BxSxKxH, segment_BxS, valid_BxS, lo, j, tiling: _Tiling):
    """Scaled scores [B, K, G, T, S] of one (query block, key chunk) tile, its mask and the
    chunk's first key position."""
    allowed_BxTxS, start = _chunk_mask(block.index, block.segment, segment_BxS, valid_BxS, lo,
                                       j, tiling)
    k_chunk = lax.dynamic_slice_in_dim(k_BxSxKxH, start, tiling.block_k, axis=1)
    scores = _dot("btkgh,bskh->bkgts", block.q, k_chunk) * (block.q.shape[-1] ** -0.5)
    return scores, allowed_BxTxS[:, None, None], start


def _split_blocks(x_BxTx, bq: int, fill=0):
    """[B, T, ...] -> [T / bq, B, bq, ...], T padded with `fill` to a multiple of bq (padded
    queries see no key and are dropped)."""
    b, t = x_BxTx.shape[:2]
    nq = -(-t // bq)
    x = jnp.pad(x_BxTx, [(0, 0), (0, nq * bq - t)] + [(0, 0)] * (x_BxTx.ndim - 2),
                constant_values=fill)
    return jnp.moveaxis(x.reshape(b, nq, bq, *x.shape[2:]), 1, 0)


def _blocks(q_BxTxKxGxH, segment_BxS, bq: int, *more):
    """Query-major blocks for lax.scan: (_Block, *more) with a leading [T / bq] axis."""
    nq = -(-q_BxTxKxGxH.shape[1] // bq)
    segment = None if segment_BxS is None else _split_blocks(segment_BxS, bq, -1)
    return (_Block(jnp.arange(nq), _split_blocks(q_BxTxKxGxH, bq), segment),
            *(_split_blocks(x, bq) for x in more))


def _unblock(x_QxBx, t: int):
    """[T / bq, B, bq, ...] -> [B, T, ...]."""
    x = jnp.moveaxis(x_QxBx, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, tiling: _Tiling):
    """Chunked attention; rows without keys come out as zeros (`_fill_keyless_rows` replaces
    them). `tiling` is static."""
    return _flash_forward(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, tiling)[0]


def _softmax_step(m_BxKxGxT, l_BxKxGxT, scores, allowed):
    """Online softmax statistics after one more key chunk: (max, sum of exp(score - max), the
    factor that rescales the old sum, exp(score - max) of this chunk)."""
    m_next = jnp.maximum(m_BxKxGxT, jnp.where(allowed, scores, _MIN).max(-1))
    p = jnp.where(allowed, jnp.exp(scores - m_next[..., None]), 0.0)
    alpha = jnp.exp(m_BxKxGxT - m_next)
    return m_next, alpha * l_BxKxGxT + p.sum(-1), alpha, p


def _flash_forward(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, tiling):
    """float32: one pass, the output rescaled as the maximum grows (online softmax). 16-bit
    inputs: two passes, the statistics first, then probabilities normalised before they are
    rounded to the input dtype for the product with v, which is how the dense path and the
    sampler's decoding step round them (one pass rounds exp(score - running max) instead, and
    the sampler's log-probs would stop agreeing bit for bit with the teacher-forced ones); this
    costs a second q.k product per tile."""
    b, t, kh, g, h = q_BxTxKxGxH.shape
    s, bq, bk = k_BxSxKxH.shape[1], tiling.block_q, tiling.block_k
    dtype = v_BxSxKxH.dtype
    two_pass = dtype != jnp.float32

    def query_block(_, block: _Block):
        lo, chunks = _key_chunks(block.index, tiling, s)

        def tile(j):
            scores, allowed, start = _chunk_scores(block, k_BxSxKxH, segment_BxS, valid_BxS,
                                                   lo, j, tiling)
            return scores, allowed, lax.dynamic_slice_in_dim(v_BxSxKxH, start, bk, axis=1)

        def online(j, carry):
            m, l, acc_BxKxGxTxH = carry
            scores, allowed, v_chunk = tile(j)
            m, l, alpha, p = _softmax_step(m, l, scores, allowed)
            pv = _dot("bkgts,bskh->bkgth", p.astype(dtype), v_chunk)
            return m, l, alpha[..., None] * acc_BxKxGxTxH + pv

        def statistics(j, carry):
            return _softmax_step(*carry, *tile(j)[:2])[:2]

        def normalised(j, acc_BxKxGxTxH):
            scores, allowed, v_chunk = tile(j)
            p = jnp.where(allowed, jnp.exp(scores - lse[..., None]), 0.0)
            return acc_BxKxGxTxH + _dot("bkgts,bskh->bkgth", p.astype(dtype), v_chunk)

        m, l = jnp.full((b, kh, g, bq), _MIN), jnp.zeros((b, kh, g, bq))
        acc = jnp.zeros((b, kh, g, bq, h))
        if two_pass:
            m, l = lax.fori_loop(0, chunks, statistics, (m, l))
        else:
            m, l, acc = lax.fori_loop(0, chunks, online, (m, l, acc))
        has_key = l > 0
        l = jnp.where(has_key, l, 1.0)
        lse = m + jnp.log(l)
        if two_pass:
            out_BxKxGxTxH = lax.fori_loop(0, chunks, normalised, acc)
        else:
            out_BxKxGxTxH = jnp.where(has_key[..., None], acc / l[..., None], 0.0)
        out_BxTxKxGxH = jnp.moveaxis(out_BxKxGxTxH, 3, 1).astype(q_BxTxKxGxH.dtype)
        return None, (out_BxTxKxGxH, jnp.moveaxis(lse, 3, 1))

    _, (out, lse) = lax.scan(query_block, None, _blocks(q_BxTxKxGxH, segment_BxS, bq)[0])
    out_BxTxKxGxH, lse_BxTxKxG = _unblock(out, t), _unblock(lse, t)
    residuals = (q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, out_BxTxKxGxH,
                 lse_BxTxKxG)
    return out_BxTxKxGxH, residuals


def _flash_backward(tiling: _Tiling, residuals, dout_BxTxKxGxH):
    """The flash-attention backward: probabilities recomputed tile by tile from the saved
    log-sum-exp; dk, dv accumulate in float32 over query blocks. Memory O(T * (N * H + tile))."""
    q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, out, lse_BxTxKxG = residuals
    t, h = q_BxTxKxGxH.shape[1], q_BxTxKxGxH.shape[-1]
    s, bq, bk = k_BxSxKxH.shape[1], tiling.block_q, tiling.block_k
    dtype = q_BxTxKxGxH.dtype
    delta_BxTxKxG = jnp.sum(dout_BxTxKxGxH.astype(jnp.float32) * out.astype(jnp.float32), -1)

    def query_block(carry, xs):
        block, dout_blk, lse_blk, delta_blk = xs
        lse_BxKxGxT, delta_BxKxGxT = jnp.moveaxis(lse_blk, 1, 3), jnp.moveaxis(delta_blk, 1, 3)
        lo, chunks = _key_chunks(block.index, tiling, s)

        def key_chunk(j, carry):
            dq_BxTxKxGxH, dk_BxSxKxH, dv_BxSxKxH = carry
            scores, allowed, start = _chunk_scores(block, k_BxSxKxH, segment_BxS, valid_BxS,
                                                   lo, j, tiling)
            p = jnp.where(allowed, jnp.exp(scores - lse_BxKxGxT[..., None]), 0.0)
            v_chunk = lax.dynamic_slice_in_dim(v_BxSxKxH, start, bk, axis=1)
            k_chunk = lax.dynamic_slice_in_dim(k_BxSxKxH, start, bk, axis=1)
            dp = _dot("btkgh,bskh->bkgts", dout_blk, v_chunk)
            ds = (p * (dp - delta_BxKxGxT[..., None])).astype(dtype)
            dq_BxTxKxGxH = dq_BxTxKxGxH + _dot("bkgts,bskh->btkgh", ds, k_chunk) * (h**-0.5)

            def add(total, part):
                chunk = lax.dynamic_slice_in_dim(total, start, bk, axis=1)
                return lax.dynamic_update_slice_in_dim(total, chunk + part, start, axis=1)

            dk_BxSxKxH = add(dk_BxSxKxH, _dot("bkgts,btkgh->bskh", ds, block.q) * (h**-0.5))
            dv_BxSxKxH = add(dv_BxSxKxH, _dot("bkgts,btkgh->bskh", p.astype(dtype), dout_blk))
            return dq_BxTxKxGxH, dk_BxSxKxH, dv_BxSxKxH

        dk, dv = carry
        dq, dk, dv = lax.fori_loop(0, chunks, key_chunk,
                                   (jnp.zeros(block.q.shape, jnp.float32), dk, dv))
        return (dk, dv), dq.astype(dtype)

    zeros = jnp.zeros(k_BxSxKxH.shape, jnp.float32)
    xs = _blocks(q_BxTxKxGxH, segment_BxS, bq, dout_BxTxKxGxH.astype(dtype), lse_BxTxKxG,
                 delta_BxTxKxG)
    (dk, dv), dq = lax.scan(query_block, (zeros, zeros), xs)
    return (_unblock(dq, t), dk.astype(k_BxSxKxH.dtype), dv.astype(v_BxSxKxH.dtype), None, None)


_flash.defvjp(_flash_forward, _flash_backward)


# ---------------------------------------------------------------------------------------------
# pallas_tpu: splash attention
# ---------------------------------------------------------------------------------------------


def _splash(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS, mask: _Mask,
            block_q: int | None, block_k: int | None):
    """Splash attention, one kernel call per batch row: lax.map, not vmap, because the TPU
    interpret mode of jax 0.10.2 cannot run a vmapped kernel (its grid gains a dimension its
    dimension semantics do not), so a vmapped version could not be tested here; each call is
    still a whole [heads, query blocks, key blocks] grid. Validity and segments become the
    kernel's segment ids (query -2 / key -1 never match); causal and the distance bound its
    static mask, whose all-masked tiles it skips. Every row keeps its diagonal tile, so no row is
    empty inside the kernel (rows without keys average the keys of their tiles;
    `_fill_keyless_rows` replaces them). T is padded to a multiple of the tiles and sliced
    back."""
    b, t, kh, g, h = q_BxTxKxGxH.shape
    default = BOUNDED_BLOCK_Q if mask.max_distance is not None else BLOCK
    round_up = functools.partial(_round_up, multiple=SPLASH_LANES)
    bq, bk = (min(block or default, round_up(t)) for block in (block_q, block_k))
    if bq % SPLASH_LANES or bk % SPLASH_LANES:
        raise InputError(f"pallas_tpu attention blocks must be multiples of {SPLASH_LANES}, "
                         f"got block_q={bq} block_k={bk}")
    tp = _round_up(t, math.lcm(bq, bk))
    pad = [(0, 0), (0, tp - t)]
    query_ids = jnp.zeros((b, t), jnp.int32) if segment_BxS is None else segment_BxS
    key_ids = jnp.where(valid_BxS, query_ids, -1)
    query_ids = jnp.where(query_ids >= 0, query_ids, -2)
    # splash takes heads first and does not scale; q.k / sqrt(H) with the scale folded into q.
    q_BxNxTxH = (q_BxTxKxGxH.astype(jnp.float32) * h**-0.5).astype(q_BxTxKxGxH.dtype)
    q_BxNxTxH = jnp.pad(q_BxNxTxH.reshape(b, t, kh * g, h), pad + [(0, 0)] * 2).transpose(
        0, 2, 1, 3)
    k_BxKxSxH, v_BxKxSxH = (jnp.pad(x, pad + [(0, 0)] * 2).transpose(0, 2, 1, 3)
                            for x in (k_BxSxKxH, v_BxSxKxH))
    query_ids = jnp.pad(query_ids, pad, constant_values=-2)
    key_ids = jnp.pad(key_ids, pad, constant_values=-1)

    def run(q, k, v, q_ids, kv_ids):
        from jax.experimental.pallas.ops.tpu import splash_attention as splash

        kernel = _splash_kernel(tp, q.shape[1], mask, bq, bk)
        return lax.map(lambda row: kernel(*row[:3], splash.SegmentIds(*row[3:])),
                       (q, k, v, q_ids, kv_ids))

    out_BxNxTxH = _shard_batch_and_heads(run, q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, query_ids,
                                         key_ids)
    return out_BxNxTxH.transpose(0, 2, 1, 3)[:, :t].reshape(b, t, kh, g, h)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@functools.lru_cache(maxsize=64)
def _splash_kernel(length: int, heads: int, mask: _Mask, bq: int, bk: int):
    """The kernel for one shape and mask; its block masks are computed once, with numpy."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (length, length)
    if mask.max_distance is not None:
        right = 0 if mask.causal else mask.max_distance
        static = splash.LocalMask(shape, window_size=(mask.max_distance, right), offset=0)
    elif mask.causal:
        static = splash.CausalMask(shape)
    else:
        static = splash.FullMask(shape)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                               block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                               block_kv_dq=bk)
    # Concrete arrays, not constants of the trace that first asks: the kernel outlives it.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([static] * heads),
                                      block_sizes=blocks, head_shards=1, q_seq_shards=1)


def _shard_batch_and_heads(fn, q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, q_ids_BxT, kv_ids_BxS):
    """fn on each device's batch rows and heads (a Pallas call is not partitioned by XLA).
    Heads are split only when the kv heads split as evenly as the query heads, so every shard
    keeps its query heads' kv heads."""
    context = sharding.active()
    if context is None:
        return fn(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, q_ids_BxT, kv_ids_BxS)
    b, n = q_BxNxTxH.shape[:2]
    batch, heads = sharding.logical_to_spec(("batch", "act_kv_heads"),
                                            (b, k_BxKxSxH.shape[1]), context)
    spec = jax.sharding.PartitionSpec
    qkv, ids = spec(batch, heads, None, None), spec(batch, None)
    return jax.shard_map(fn, mesh=context.mesh, in_specs=(qkv, qkv, qkv, ids, ids),
                         out_specs=qkv, check_vma=False)(
        q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, q_ids_BxT, kv_ids_BxS)


# ---------------------------------------------------------------------------------------------
# cudnn: jax.nn.dot_product_attention
# ---------------------------------------------------------------------------------------------


def _dot_product_attention(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, segment_BxS, valid_BxS,
                           mask: _Mask, implementation: str):
    """jax.nn.dot_product_attention with the whole mask as a boolean [B, 1, T, S] (cuDNN's
    padding lengths cannot say left padding or segments); is_causal lets cuDNN skip the tiles
    above the diagonal. `implementation="xla"` runs the same call anywhere (the tests do)."""
    b, t, kh, g, h = q_BxTxKxGxH.shape
    if implementation == "cudnn" and q_BxTxKxGxH.dtype not in (jnp.bfloat16, jnp.float16):
        raise InputError(f"cudnn attention needs bfloat16 or float16 compute, got "
                         f"{q_BxTxKxGxH.dtype}: set model.attention_impl='xla' for float32")
    positions = jnp.arange(t)
    allowed_BxTxS = _allowed(positions, positions, segment_BxS, segment_BxS, valid_BxS, mask)
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxKxGxH.reshape(b, t, kh * g, h), k_BxSxKxH, v_BxSxKxH, mask=allowed_BxTxS[:, None],
        is_causal=mask.causal, implementation=implementation)
    return out_BxTxNxH.reshape(b, t, kh, g, h)

