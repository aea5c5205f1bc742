"""The Flax port's logits equal transformers' (float32) on tiny random Qwen2.5-VL checkpoints.

Bound: max |ours - reference| <= 1e-5 * max |reference| over the non-padding positions, on weights
whose logits have std >= 0.1. The checkpoints use initializer_range 0.2 (logit std ~1.6): with the
testing default 0.5, transformers' own eager and sdpa float32 paths already differ by 1e-5 relative
on image prompts, so the bound would measure rounding noise instead of the port.

Each model variant is built once per module and its prompts run through the port as ONE left-padded
batch (processing/qwen_rows.py: the path the trainer and sampler use), against transformers on
each prompt alone and on a left-padded batch of two.
"""

from __future__ import annotations

import numpy as np
import pytest

from eureka_jax import hf_io, testing, verify
from eureka_jax.batch import Buckets
from eureka_jax.families import qwen2_5_vl as qwen
from eureka_jax.processing import QwenVLProcessor
from eureka_jax.processing.qwen_rows import collate_prompts, prompt_row

REL_TOLERANCE = 1e-5
MIN_LOGIT_STD = 0.1
# bfloat16 port vs float32 transformers, measured per prompt over all three variants: rel_diff
# 0.035-0.067 and greedy agreement 0.90-0.98 (transformers' own bfloat16 model: 0.026-0.069 and
# 0.93-1.0).
BF16_REL_TOLERANCE = 0.1
BF16_MIN_GREEDY_AGREEMENT = 0.85
INITIALIZER_RANGE = 0.2

# name -> make_hf_model_dir overrides. Attention heads are 4, so kv heads 4/2/1 are GQA ratios
# 1/2/4; mrope_section splits the 8 rotary frequencies of head_dim 16 differently; window 56 px is
# 2x2 merged units, 112 px is 4x4.
VARIANTS = {
    "gqa2_w56_untied": dict(num_key_value_heads=2, window_size=56, mrope_section=(2, 3, 3)),
    "gqa1_w112_tied": dict(num_key_value_heads=4, window_size=112, mrope_section=(4, 2, 2),
                           tie_word_embeddings=True),
    "gqa4_w112_untied": dict(num_key_value_heads=1, window_size=112, mrope_section=(1, 3, 4)),
}

# (width, height) -> merged grid (rows x columns) with the tiny processor's min/max pixels:
# 30x40 -> 3x2, 200x300 -> 9x6, 28x600 -> 21x1 (aspect ratio 21), 224x112 -> 4x8. Only 4x8 is a
# multiple of both windows (2 and 4 units); 9x6 is a multiple of neither in rows.
PROMPTS = {
    "text": ("What is 12 * 7 / 2? Think step by step.", []),
    "one_image": ("What is in the picture?", [(30, 40, 1)]),
    "three_images": ("Compare the three pictures.", [(30, 40, 2), (200, 300, 3), (28, 600, 4)]),
    "window_multiple": ("Count the shapes.", [(224, 112, 5)]),
}


def _make_dir(path, overrides):
    overrides = dict(overrides)
    mrope = list(overrides.pop("mrope_section"))
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope}
    return testing.make_hf_model_dir(path, initializer_range=INITIALIZER_RANGE,
                                     text_config={"rope_parameters": rope}, **overrides)


class Run:
    """One variant: its checkpoint, prompts, the port's batched logits and the reference model."""

    def __init__(self, name, model_dir):
        self.name, self.model_dir = name, model_dir
        self.processor = QwenVLProcessor.from_pretrained(model_dir)
        self.prompts = {
            name: self.processor.encode(
                question=question, images=[testing.draw_image(w, h, seed) for w, h, seed in sizes])
            for name, (question, sizes) in PROMPTS.items()
        }
        self.model = hf_io.load_model(model_dir)
        self.config = self.model.config
        rows = [prompt_row(p, self.config, name=name) for name, p in self.prompts.items()]
        self.batch = collate_prompts(rows, Buckets(lengths=(64, 128, 256), patches=(0, 128, 512)),
                                     pad_token_id=self.processor.pad_token_id)
        self.logits_BxTxV = verify.port_logits(self.model, self.batch)
        self.reference = qwen.load_reference(model_dir)

    def reference_logits(self, names, padding_side="left"):
        arrays = qwen.hf_arrays([self.prompts[n] for n in names], self.processor.pad_token_id,
                                  padding_side)
        return qwen.reference_logits(self.reference, arrays, self.config.image_token_id), arrays

    def ours(self, name):
        """The port's logits for one prompt, padding dropped: (T, V)."""
        row = list(self.prompts).index(name)
        return self.logits_BxTxV[row][self.batch.attention_mask_BxT[row]]


_RUNS: dict[str, Run] = {}


def _run(name, tmp_path_factory) -> Run:
    if name not in _RUNS:
        _RUNS[name] = Run(name, _make_dir(tmp_path_factory.mktemp(name), VARIANTS[name]))
    return _RUNS[name]


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The first variant (shared with `run`), for the checks that need one variant only."""
    return _run(next(iter(VARIANTS)), tmp_path_factory)


def assert_parity(ours_TxV, reference_TxV, what):
    reference_std = reference_TxV.std()
    assert reference_std >= MIN_LOGIT_STD, f"{what}: reference logits too flat ({reference_std})"
    max_diff = np.abs(ours_TxV - reference_TxV).max()
    bound = REL_TOLERANCE * np.abs(reference_TxV).max()
    assert max_diff <= bound, f"{what}: max |diff| {max_diff:.3e} > {bound:.3e}"
    # Greedy next token at every position, except where the reference's top two are a near tie.
    top2 = np.sort(reference_TxV, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * max_diff
    assert clear[-1] and clear.mean() > 0.9, f"{what}: too many near-ties to test greedy decoding"
    agree = ours_TxV.argmax(-1) == reference_TxV.argmax(-1)
    assert agree[clear].all(), f"{what}: greedy tokens differ at positions {np.flatnonzero(~agree)}"


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_match_transformers_per_prompt(run, prompt):
    reference_1xTxV, _ = run.reference_logits([prompt])
    assert_parity(run.ours(prompt), reference_1xTxV[0], prompt)


def test_left_padded_batch_of_two_matches_transformers(run):
    names = ["text", "three_images"]
    reference_BxTxV, arrays = run.reference_logits(names, padding_side="left")
    for b, name in enumerate(names):
        valid = arrays["attention_mask"][b].astype(bool)
        assert_parity(run.ours(name), reference_BxTxV[b][valid], f"batch row {b} ({name})")


def test_unjitted_forward_matches_transformers(base_run):
    """The same program without jit (op by op) on the text prompt, alone and unpadded."""
    run = base_run
    reference_1xTxV, arrays = run.reference_logits(["text"])
    eager_1xTxV = verify.port_logits(run.model, qwen.port_inputs(arrays, run.config), jit=False)
    assert_parity(eager_1xTxV[0], reference_1xTxV[0], "un-jitted text")


def test_bfloat16_agreement(base_run, capsys):
    """bfloat16 parameters and compute against float32 transformers: a loose, measured bound, and
    no worse than transformers' own bfloat16 model (rel_diff 0.026-0.069 on these prompts)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    run = base_run
    model = hf_io.load_model(run.model_dir, param_dtype="bfloat16", compute_dtype="bfloat16")
    hf_bf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(run.model_dir), dtype=torch.bfloat16).eval()
    logits_BxTxV = verify.port_logits(model, run.batch)
    ours, theirs, reference = [], [], []
    for row, name in enumerate(run.prompts):
        reference_1xTxV, arrays = run.reference_logits([name])
        reference.append(reference_1xTxV[0])
        ours.append(logits_BxTxV[row][run.batch.attention_mask_BxT[row]])
        theirs.append(qwen.reference_logits(hf_bf16, arrays, run.config.image_token_id)[0])
    reference_NxV = np.concatenate(reference)
    everything = np.ones((1, len(reference_NxV)))
    stats = verify.compare(np.concatenate(ours)[None], reference_NxV[None], everything)
    hf_stats = verify.compare(np.concatenate(theirs)[None], reference_NxV[None], everything)
    with capsys.disabled():
        print(f"\nbfloat16 vs float32 transformers: port rel_diff {stats['rel_diff']:.4f} greedy "
              f"{stats['greedy_agree']:.3f}; transformers bfloat16 rel_diff "
              f"{hf_stats['rel_diff']:.4f} greedy {hf_stats['greedy_agree']:.3f}")
    assert stats["rel_diff"] <= BF16_REL_TOLERANCE, stats
    assert stats["rel_diff"] <= 2 * hf_stats["rel_diff"], (stats, hf_stats)
    assert stats["greedy_agree"] >= BF16_MIN_GREEDY_AGREEMENT, stats
