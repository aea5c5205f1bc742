"""Published Qwen2.5-VL and InternVL2.5 hyperparameters, so that a hub id can be planned without
downloading it. Each entry's model_type picks its family's config class (eureka_jax/families).

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


QWEN_CONFIGS: dict[str, dict[str, Any]] = {
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


# InternVL2.5 in transformers' native layout (model_type internvl: text_config and vision_config
# nested), the shapes of OpenGVLab/InternVL2_5-8B and -38B: InternViT-300M-448px-V2_5 (24 layers
# of width 1024, LayerNorm, q/k/v biases) + InternLM2.5-7B-chat as llama (32 layers, GQA 32/8,
# dynamic NTK rope x2, vocabulary 92553); InternViT-6B-448px-V2_5 (45 layers of width 3200,
# RMSNorm, QK-norm, no q/k/v biases) + Qwen2.5-32B (64 layers, GQA 40/8, vocabulary 151674).
# Both: 448 px tiles of 14 px patches, pixel shuffle 0.5 -> 256 tokens per tile, untied heads.
# Written from the released config.json files (llm_config / vision_config), not re-read here:
# this machine has no hub access. A local directory's config.json always takes precedence.
_INTERNVL_TOP = {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
                 "downsample_ratio": 0.5, "image_seq_length": 256, "vision_feature_layer": -1,
                 "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
                 "tie_word_embeddings": False}
_VISION_COMMON = {"image_size": [448, 448], "patch_size": [14, 14], "hidden_act": "gelu",
                  "layer_norm_eps": 1e-6, "use_mean_pooling": True}
INTERNVL_CONFIGS: dict[str, dict[str, Any]] = {
    "OpenGVLab/InternVL2_5-8B": {
        **_INTERNVL_TOP, "image_token_id": 92546,
        "vision_config": {**_VISION_COMMON, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_attention_heads": 16, "num_hidden_layers": 24,
                          "norm_type": "layer_norm", "attention_bias": True,
                          "use_qk_norm": False},
        "text_config": {"model_type": "llama", "vocab_size": 92553, "hidden_size": 4096,
                        "intermediate_size": 14336, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8,
                        "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
                        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                            "rope_theta": 1000000.0},
                        "bos_token_id": 1, "eos_token_id": 92542, "pad_token_id": 2},
    },
    "OpenGVLab/InternVL2_5-38B": {
        **_INTERNVL_TOP, "image_token_id": 151667,
        "vision_config": {**_VISION_COMMON, "hidden_size": 3200, "intermediate_size": 12800,
                          "num_attention_heads": 25, "num_hidden_layers": 45,
                          "norm_type": "rms_norm", "attention_bias": False,
                          "use_qk_norm": True},
        "text_config": {"model_type": "qwen2", "vocab_size": 151674, "hidden_size": 5120,
                        "intermediate_size": 27648, "num_hidden_layers": 64,
                        "num_attention_heads": 40, "num_key_value_heads": 8,
                        "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                        "rope_theta": 1000000.0, "eos_token_id": 151645,
                        "pad_token_id": 151643},
    },
}
# The -Pretrain (MM-Eureka-Zero's start) and -MPO checkpoints share their base model's shapes.
INTERNVL_CONFIGS["OpenGVLab/InternVL2_5-38B-Pretrain"] = INTERNVL_CONFIGS[
    "OpenGVLab/InternVL2_5-38B"]
HF_CONFIGS: dict[str, dict[str, Any]] = {**QWEN_CONFIGS, **INTERNVL_CONFIGS}


def preset_config(name: str, **runtime):
    """The model config (of its family) of a hub id in HF_CONFIGS (case-insensitive; the
    -Instruct suffix may be left out), with runtime fields (param_dtype, compute_dtype, remat,
    freeze_vision)."""
    from eureka_jax import families

    wanted = name.lower().removesuffix("-instruct")
    for hub_id, hf in HF_CONFIGS.items():
        if hub_id.lower().removesuffix("-instruct") == wanted:
            return families.get(hf["model_type"]).config_class.from_hf_dict(hf, **runtime)
    raise InputError(f"{name}: not a local model directory nor a known preset "
                     f"({', '.join(HF_CONFIGS)})")
