"""Host-side preprocessing for Qwen2.5-VL, equal to the Hugging Face processor, and the
static-shape layout the Flax model consumes. NumPy + PIL only (transformers for the tokenizer).

    processor = QwenVLProcessor.from_pretrained(model_dir, min_pixels=4*28*28, max_pixels=640*28*28)
    prompt = processor.encode(question="...", images=[pil_or_path], system=SYSTEM_PROMPT)
    batch = collate_prompts([prompt, ...], length=1024, patch_budget=4096,
                            pad_token_id=processor.pad_token_id,
                            image_token_id=processor.image_token_id, window_size=112)

Modules: `image` (load, smart_resize, patches), `prompt` (chat template, image-pad expansion,
tokenisation), `layout` (M-RoPE positions, vision window layout, buckets), `batch` (collation).
"""

from eureka_jax.processing.batch import PromptBatch, collate_prompts
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
    "PromptBatch",
    "QwenVLProcessor",
    "VisionLayout",
    "collate_prompts",
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
