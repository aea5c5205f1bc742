"""Published Qwen2.5-VL hyperparameters, so that a hub id can be planned without downloading it.

Each preset is the part of the model's hub config.json that fixes its shapes (hub layout: text
fields at the top level, `vision_config` nested), for `Qwen25VLConfig.from_hf_dict`. Values from
the Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct config.json files. Shared by all four: a 32-block
vision tower of width 1280 (16 heads, 14 px patches, temporal patch 2, 2x2 merge, 112 px windows,
full attention in blocks 7, 15, 23, 31), rope_theta 1e6, M-RoPE sections (16, 24, 24), head_dim
128, RMSNorm eps 1e-6. They differ in the language model, in the vision MLP width (3420 for 3B/7B,
3456 for 32B/72B) and in the merger's output width (= the LM hidden size). Only the 3B ties its
embeddings (vocabulary 151936; the others 152064 with a separate lm_head).
"""

from __future__ import annotations

from typing import Any

from eureka_jax.errors import InputError
from eureka_jax.models.qwen2_5_vl import Qwen25VLConfig

_COMMON_TEXT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
}
_COMMON_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}


def _preset(*, hidden, intermediate, layers, heads, kv_heads, vocab, tie, vision_intermediate):
    return {
        **_COMMON_TEXT,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "vision_config": {**_COMMON_VISION, "intermediate_size": vision_intermediate,
                          "out_hidden_size": hidden},
    }


HF_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": _preset(
        hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151936,
        tie=True, vision_intermediate=3420),
    "Qwen/Qwen2.5-VL-7B-Instruct": _preset(
        hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064,
        tie=False, vision_intermediate=3420),
    "Qwen/Qwen2.5-VL-32B-Instruct": _preset(
        hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8, vocab=152064,
        tie=False, vision_intermediate=3456),
    "Qwen/Qwen2.5-VL-72B-Instruct": _preset(
        hidden=8192, intermediate=29568, layers=80, heads=64, kv_heads=8, vocab=152064,
        tie=False, vision_intermediate=3456),
}


def preset_config(name: str, **runtime) -> Qwen25VLConfig:
    """The Qwen25VLConfig of a hub id in HF_CONFIGS (case-insensitive; the -Instruct suffix may be
    left out), with runtime fields (param_dtype, compute_dtype, remat, freeze_vision)."""
    wanted = name.lower().removesuffix("-instruct")
    for hub_id, hf in HF_CONFIGS.items():
        if hub_id.lower().removesuffix("-instruct") == wanted:
            return Qwen25VLConfig.from_hf_dict(hf, **runtime)
    raise InputError(f"{name}: not a local model directory nor a known preset "
                     f"({', '.join(HF_CONFIGS)})")
