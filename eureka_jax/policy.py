"""The policy's teacher-forced forward: log-probs (and entropies) of response tokens under a model,
for the update, the rollout's old / reference log-probs and supervised fine-tuning.

Works with any model family's model (the method contract in eureka_jax/families): the vision
tower runs once per unique prompt, then one causal pass over prompt + response.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eureka_jax.batch import TrainBatch, cut_by_prompt


def response_hidden(model, batch: TrainBatch) -> jax.Array:
    """Teacher-forced final hidden states [B, L, D] at the positions that predict the response
    tokens, in one causal pass over prompt + response.

    The vision tower runs once per unique prompt; its features are gathered per response.
    """
    prompts = batch.prompts
    index = batch.prompt_index_B
    features = None
    if prompts.vision is not None:
        features = model.encode_images(prompts.vision)[index]
    ids_BxT = prompts.input_ids_BxT[index]
    t = ids_BxT.shape[1]
    length = batch.response_tokens_BxL.shape[1]
    tokens = jnp.concatenate([ids_BxT, batch.response_tokens_BxL], axis=1)
    mask = jnp.concatenate([prompts.attention_mask_BxT[index], batch.response_mask_BxL], axis=1)
    response_positions_BxL = prompts.next_position_B[index][:, None] + jnp.arange(length)
    positions = jnp.concatenate(
        [prompts.positions_3xBxT[:, index],
         jnp.broadcast_to(response_positions_BxL, (3, *response_positions_BxL.shape))], axis=2)
    sources = jnp.concatenate(
        [prompts.token_source_BxT[index], jnp.full(batch.response_tokens_BxL.shape, -1)], axis=1)
    x = model.embed(tokens, features, sources)
    hidden, _ = model.decode(x, positions, mask.astype(bool))
    # Position t-1+i predicts response token i.
    return hidden[:, t - 1: t - 1 + length]


def response_logits(model, batch: TrainBatch) -> jax.Array:
    """Teacher-forced logits [B, L, V] (compute dtype) of the response tokens, all at once (for
    tests and tools; training goes through `response_logprobs`, which never builds them)."""
    return model.logits(response_hidden(model, batch))


def response_logprobs(model, batch: TrainBatch, *, with_entropy: bool = False):
    """Teacher-forced float32 log-probs (and entropies) of the response tokens, [B, L].

    The logits exist `model.config.logits_chunk` response positions at a time: the chunks are a
    lax.map whose body is rematerialised (jax.checkpoint), so the backward pass recomputes one
    chunk's logits at a time instead of keeping [B, L, V] of them."""
    hidden_BxLxD = response_hidden(model, batch)
    return chunked_logprobs(model.logits, hidden_BxLxD, batch.response_tokens_BxL,
                            model.config.logits_chunk, with_entropy)


def chunked_logprobs(head, hidden_BxLxD, targets_BxL, chunk: int, with_entropy: bool):
    """(log p(target), entropy or None) [B, L] float32 from hidden states, `chunk` positions of
    `head(hidden) -> logits` at a time (0, or chunk >= L: one piece, no loop)."""

    def piece(hidden_BxCxD, targets_BxC):
        logits_BxCxV = head(hidden_BxCxD)
        logp_BxC = token_logprobs(logits_BxCxV, targets_BxC)
        entropy_BxC = token_entropy(logits_BxCxV) if with_entropy else jnp.zeros_like(logp_BxC)
        return logp_BxC, entropy_BxC

    b, length, d = hidden_BxLxD.shape
    if chunk == 0 or chunk >= length:
        logp_BxL, entropy_BxL = piece(hidden_BxLxD, targets_BxL)
    else:
        pieces = -(-length // chunk)
        pad = pieces * chunk - length
        hidden_NxBxCxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0))).reshape(
            b, pieces, chunk, d).swapaxes(0, 1)
        targets_NxBxC = jnp.pad(targets_BxL, ((0, 0), (0, pad))).reshape(
            b, pieces, chunk).swapaxes(0, 1)
        logp_NxBxC, entropy_NxBxC = jax.lax.map(
            lambda xs: jax.checkpoint(piece)(*xs), (hidden_NxBxCxD, targets_NxBxC))
        logp_BxL = logp_NxBxC.swapaxes(0, 1).reshape(b, -1)[:, :length]
        entropy_BxL = entropy_NxBxC.swapaxes(0, 1).reshape(b, -1)[:, :length]
    return logp_BxL, entropy_BxL if with_entropy else None


def token_logprobs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """float32 log p(target) = logit[target] - logsumexp(logits), from logits of any dtype.

    Gathers before normalising, so no [B, T, V] log-softmax is built; under jit XLA fuses the
    float32 cast into the logsumexp reduction, so no float32 copy of the logits is kept either.
    """
    target_logits_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    log_normaliser_BxT = jax.nn.logsumexp(logits_BxTxV.astype(jnp.float32), axis=-1)
    return target_logits_BxT.astype(jnp.float32) - log_normaliser_BxT


def token_entropy(logits_BxTxV: jax.Array) -> jax.Array:
    """float32 entropy per token, H = logsumexp(z) - sum softmax(z) z, from finite logits."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    log_normaliser_BxTx1 = jax.nn.logsumexp(logits_BxTxV, axis=-1, keepdims=True)
    probs_BxTxV = jnp.exp(logits_BxTxV - log_normaliser_BxTx1)
    return log_normaliser_BxTx1[..., 0] - (probs_BxTxV * logits_BxTxV).sum(axis=-1)


def make_forward_logprobs(graphdef, sequences_per_pass: int = 0):
    """jit(params, TrainBatch) -> teacher-forced log-probs [B, L] of the response tokens. Weights
    are an argument, so the policy (old log-probs, mismatch) and the reference share one
    program. With `sequences_per_pass` (a multiple of the group size) the responses go through
    the model that many at a time, whole groups with their prompts (a lax.map over
    `cut_by_prompt` pieces), so the forward's memory is one pass's, not the rollout chunk's."""
    from flax import nnx

    def forward_logprobs(params, batch):
        model = nnx.merge(graphdef, params)
        sequences = batch.response_tokens_BxL.shape[0]
        if not sequences_per_pass or sequences <= sequences_per_pass:
            return response_logprobs(model, batch)[0]
        if sequences % sequences_per_pass:
            raise ValueError(f"{sequences} sequences do not split into passes of "
                             f"{sequences_per_pass}")
        pieces = cut_by_prompt(batch, sequences // sequences_per_pass)
        logp_PxSxL = jax.lax.map(lambda piece: response_logprobs(model, piece)[0], pieces)
        return logp_PxSxL.reshape(sequences, -1)

    return jax.jit(forward_logprobs)
