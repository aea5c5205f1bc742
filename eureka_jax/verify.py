"""The Flax port against transformers: HF processor arrays in, logits out, differences measured.

The Hugging Face processor returns one padded batch (`input_ids`, `attention_mask` (B, T) and the
family's image arrays); a family's `port_inputs` turns it into the port's PromptBatch without
moving any token, so logits[b, t] of the port and of transformers describe the same token.

    family = families.for_model_dir(model_dir)
    ours = port_logits(model, family.port_inputs(arrays, model.config))
    theirs = family.reference_logits(family.load_reference(model_dir), arrays, model.config)
    compare(ours, theirs, arrays["attention_mask"])  # {"max_abs_diff": ..., "rel_diff": ...}

torch and transformers' models are imported inside the functions that need them only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eureka_jax.batch import PromptBatch
from eureka_jax.errors import InputError

# ---------------------------------------------------------------------------------------------
# HF processor arrays, checked
# ---------------------------------------------------------------------------------------------


def token_arrays(input_ids: list[np.ndarray], pad_token_id: int, padding_side: str = "left",
                 ) -> dict[str, np.ndarray]:
    """`input_ids` and `attention_mask` (B, T) int64 as a HF processor pads a batch of prompts."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(ids) for ids in input_ids)
    ids_BxT = np.full((len(input_ids), length), pad_token_id, np.int64)
    mask_BxT = np.zeros((len(input_ids), length), np.int64)
    for b, ids in enumerate(input_ids):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        ids_BxT[b, span] = ids
        mask_BxT[b, span] = 1
    return {"input_ids": ids_BxT, "attention_mask": mask_BxT}


def integer_array(arrays: Mapping[str, np.ndarray], key: str, ndim: int, source: str,
                   ) -> np.ndarray:
    """arrays[key] as an integer array of `ndim` dimensions, or an InputError naming it."""
    if key not in arrays:
        raise InputError(f"{source}: missing array {key!r} (have {sorted(arrays)}); save the HF "
                         "processor's output with np.savez(path, **processor(...))")
    array = np.asarray(arrays[key])
    if array.ndim != ndim or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{source}: {key!r} must be a {ndim}-D integer array, got shape "
                         f"{array.shape} dtype {array.dtype}")
    return array


def checked_tokens(arrays: Mapping[str, np.ndarray], vocab_size: int, source: str,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask as bool) of HF processor arrays, checked: 2-D integers, a 0/1
    mask of the same shape (all ones when omitted), ids within the vocabulary."""
    ids_BxT = integer_array(arrays, "input_ids", 2, source)
    if "attention_mask" in arrays:
        mask_BxT = integer_array(arrays, "attention_mask", 2, source)
        if mask_BxT.shape != ids_BxT.shape or not np.isin(mask_BxT, (0, 1)).all():
            raise InputError(f"{source}: attention_mask must be 0/1 with the shape of input_ids "
                             f"{ids_BxT.shape}, got shape {mask_BxT.shape}")
        mask_BxT = mask_BxT.astype(bool)
    else:
        mask_BxT = np.ones(ids_BxT.shape, bool)
    if ids_BxT.size and (ids_BxT.min() < 0 or ids_BxT.max() >= vocab_size):
        raise InputError(f"{source}: input_ids must lie in [0, {vocab_size}) (the model's "
                         f"vocab_size), got [{ids_BxT.min()}, {ids_BxT.max()}]; wrong tokenizer?")
    return ids_BxT, mask_BxT


# ---------------------------------------------------------------------------------------------
# The port's logits
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _forward(graphdef: nnx.GraphDef, jit: bool):
    """The teacher-forced forward of models with this structure; the jitted one is kept so that
    equal shapes are compiled once (graph definitions of equal configs are equal)."""

    def forward(state, batch: PromptBatch):
        model = nnx.merge(graphdef, state)
        logits = model(batch.input_ids_BxT, batch.positions_3xBxT, batch.attention_mask_BxT,
                       vision=batch.vision, token_source_BxT=batch.token_source_BxT)
        return logits.astype(jnp.float32)

    return jax.jit(forward) if jit else forward


def port_logits(model, batch: PromptBatch, *, jit: bool = True) -> np.ndarray:
    """The port's teacher-forced logits (B, T, V) as float32 NumPy. Runs on the active mesh, if
    any (`with sharding.activate(mesh):`)."""
    graphdef, state = nnx.split(model)
    logits = _forward(graphdef, jit)(state, jax.tree.map(jnp.asarray, batch))
    return np.asarray(jax.device_get(logits))


# ---------------------------------------------------------------------------------------------
# Port against reference
# ---------------------------------------------------------------------------------------------


def compare(ours_BxTxV: np.ndarray, reference_BxTxV: np.ndarray, mask_BxT: np.ndarray,
            ) -> dict[str, float]:
    """Differences over the non-padding positions.

    rel_diff = max |ours - reference| / max |reference|; greedy_agree = fraction of positions
    whose argmax (the greedy next token) is the same.
    """
    valid = np.asarray(mask_BxT).astype(bool)
    ours, reference = ours_BxTxV[valid], reference_BxTxV[valid]
    max_abs_diff = float(np.abs(ours - reference).max())
    reference_max = float(np.abs(reference).max())
    return {
        "max_abs_diff": max_abs_diff,
        "rel_diff": max_abs_diff / reference_max,
        "greedy_agree": float((ours.argmax(-1) == reference.argmax(-1)).mean()),
        "reference_max": reference_max,
        "reference_std": float(reference.std()),
    }


# ---------------------------------------------------------------------------------------------
# verify-port
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    cases: dict[str, dict[str, float]]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(case["rel_diff"] <= self.tolerance for case in self.cases.values())

    def table(self) -> str:
        header = (f"{'case':<20} {'max|diff|':>11} {'max|ref|':>10} {'rel_diff':>10} "
                  f"{'greedy':>7}  ok")
        lines = [header, "-" * len(header)]
        for name, c in self.cases.items():
            ok = "yes" if c["rel_diff"] <= self.tolerance else "NO"
            lines.append(f"{name:<20} {c['max_abs_diff']:>11.3e} {c['reference_max']:>10.3f} "
                         f"{c['rel_diff']:>10.3e} {c['greedy_agree']:>7.3f}  {ok}")
        return "\n".join(lines)


def verify_port(model_dir: str | os.PathLike, *, dtype: str = "float32",
                tolerance: float = 1e-5, images=None) -> VerifyReport:
    """Run transformers (float32) and the port (`dtype`) on the family's `verification_cases`
    built with the directory's own processor (`images`: families.ImageOptions overriding its
    image settings). Passed when every case's rel_diff <= tolerance."""
    from eureka_jax import families, hf_io

    model_dir = hf_io.resolve_model_dir(model_dir)
    family = families.for_model_dir(model_dir)
    cases = family.verification_cases(family.load_processor(model_dir, images))
    model = family.load_model(model_dir, param_dtype=dtype, compute_dtype=dtype)
    config = model.config
    ours = {name: port_logits(model, family.port_inputs(arrays, config, source=name))
            for name, arrays in cases.items()}
    del model  # one model in memory at a time: real checkpoints are large
    reference = family.load_reference(model_dir)
    results = {
        name: compare(ours[name], family.reference_logits(reference, arrays, config),
                      arrays["attention_mask"])
        for name, arrays in cases.items()
    }
    return VerifyReport(results, tolerance)
