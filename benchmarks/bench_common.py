"""Pieces the benchmark scripts share (imported as a sibling module: the scripts run as
`python benchmarks/NAME.py`, which puts this directory on sys.path)."""

from __future__ import annotations

import numpy as np

# The model of the forward and train-step benchmarks: big enough that matrix work dominates.
TEXT_512 = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [8, 12, 12]})
VISION_DEPTH_4 = dict(hidden_size=256, intermediate_size=768, depth=4, num_heads=4,
                      window_size=112, fullatt_block_indexes=[1, 3])


def hf_prompt_inputs(encoded, length: int, pad_token_id: int, image_token_id: int,
                     response_ids=None, response_mask=None) -> dict:
    """transformers' inputs for encoded prompts left-padded to `length` (then the responses, if
    given), with mm_token_type_ids so Qwen2.5-VL uses 3-D positions, and the image patches."""
    import torch

    ids = np.full((len(encoded), length), pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, length - len(e.input_ids):] = e.input_ids
        mask[row, length - len(e.input_ids):] = 1
    if response_ids is not None:
        ids = np.concatenate([ids, np.asarray(response_ids, np.int64)], axis=1)
        mask = np.concatenate([mask, np.asarray(response_mask, np.int64)], axis=1)
    inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask),
              "mm_token_type_ids": torch.as_tensor((ids == image_token_id).astype(np.int64))}
    if any(e.patches for e in encoded):
        inputs["pixel_values"] = torch.as_tensor(
            np.concatenate([p for e in encoded for p in e.patches]))
        inputs["image_grid_thw"] = torch.as_tensor(
            np.concatenate([e.image_grid_thw for e in encoded]).astype(np.int64))
    return inputs
