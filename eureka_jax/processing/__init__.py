"""Host-side preprocessing for Qwen2.5-VL, equal to the Hugging Face processor, and the
static-shape layout the Flax model consumes. NumPy + PIL only (transformers for the tokenizer).

    processor = QwenVLProcessor.from_pretrained(model_dir, min_pixels=4*28*28, max_pixels=640*28*28)
    prompt = processor.encode(question="...", images=[pil_or_path], system=SYSTEM_PROMPT)
    layout = vision_layout(prompt.image_grid_thw, patch_budget, window_size=112)
    patches_PxC = gather_patches(prompt.patches, layout)
    ids_1xT, image_id = prompt.input_ids[None], processor.image_token_id
    token_source_1xT = image_token_sources(ids_1xT, image_id, layout)
    positions_3x1xT, rope_deltas_1 = mrope_positions(ids_1xT, None, prompt.image_grid_thw, image_id)

Modules: `image` (load, smart_resize, patches), `prompt` (chat template, image-pad expansion,
tokenisation), `layout` (M-RoPE positions, vision window layout, buckets); `qwen_rows` applies
the layout per prompt row and pads rows into batches. InternVL's: `internvl` (tiling, image
tokens, rows). `examples`: a dataset record -> the family's prompt row (eureka_jax/families).
"""

from eureka_jax.processing.image import (
    ImageSettings,
    load_image,
    preprocess_image,
    preprocess_with,
    smart_resize,
    to_rgb,
)
from eureka_jax.processing.layout import (
    VisionLayout,
    gather_patches,
    image_token_sources,
    mrope_positions,
    next_bucket,
    vision_layout,
)
from eureka_jax.processing.prompt import EncodedPrompt, QwenVLProcessor

__all__ = [
    "EncodedPrompt",
    "ImageSettings",
    "QwenVLProcessor",
    "VisionLayout",
    "gather_patches",
    "image_token_sources",
    "load_image",
    "mrope_positions",
    "next_bucket",
    "preprocess_image",
    "preprocess_with",
    "smart_resize",
    "to_rgb",
    "vision_layout",
]
