"""Shared test fixtures: a tiny Qwen2.5-VL tokenizer, config, HF model directory and images.

Importable without torch: torch and transformers models are imported inside the functions that
need them. Everything is built locally (no hub downloads) and is deterministic for a given seed.

    ids = make_tokenizer_dir(tmp_path / "tok")        # tokenizer + preprocessor config
    model_dir = make_hf_model_dir(tmp_path / "model")  # + config + safetensors (needs torch)
    image = draw_image(60, 40, seed=0)
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# The Qwen2-VL / Qwen2.5-VL chat template, verbatim from the Qwen2.5-VL-*-Instruct hub repos.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL's added tokens in their hub order (ids 151643.. there; here they follow the BPE vocab).
# <tool_call> and </tool_call> are added but not special in the real tokenizer.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_NONSPECIAL_ADDED = ("<tool_call>", "</tool_call>")
QWEN_SPECIAL_TOKENS_TAIL = (
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_CORPUS = """\
You are a helpful assistant. A conversation between User and Assistant. The user asks a question,
and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and
then provides the user with the answer. The reasoning process and answer are enclosed within
<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here
</think><answer> answer here </answer>. Put the final answer in \\boxed{}.
What is the area of the triangle in the figure? The base is 12 and the height is 7.
<think> The area of a triangle is half the base times the height: 12 * 7 / 2 = 42. </think>
<answer> \\boxed{42} </answer>
Find the value of x such that 3x + 5 = 20. Subtract 5 from both sides: 3x = 15, so x = 5.
<think> Let me compute the angle. The sum of angles in a triangle is 180 degrees. </think>
<answer> The answer is \\boxed{60} degrees. </answer>
Which of the following is correct? A. 1 B. 2 C. 3 D. 4. The correct option is C.
The circle has radius 4, so its circumference is 2 * pi * 4 = 8 pi and its area is 16 pi.
\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. \\sqrt{16} = 4. 2^10 = 1024. 0 1 2 3 4 5 6 7 8 9
sum, product, equation, function, graph, probability, percent, ratio, square, rectangle, length,
width, perimeter, volume, cube, sphere, cylinder, number, integer, fraction, decimal, total.
"""


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE (deterministic) and add Qwen2.5-VL's added tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)

    def added(content: str, special: bool) -> AddedToken:
        return AddedToken(content, special=special, normalized=False, lstrip=False,
                          rstrip=False, single_word=False)

    tokenizer.add_special_tokens([added(t, True) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([added(t, False) for t in QWEN_NONSPECIAL_ADDED])
    tokenizer.add_special_tokens([added(t, True) for t in QWEN_SPECIAL_TOKENS_TAIL])
    return tokenizer.to_str()


def tiny_token_ids(vocab_size: int = 600) -> dict[str, int]:
    """Ids of the tiny tokenizer's special tokens by name, plus "vocab_size" (its full length)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(_tiny_tokenizer_json(vocab_size))
    ids = {t: tokenizer.token_to_id(t) for t in (*QWEN_SPECIAL_TOKENS, *QWEN_SPECIAL_TOKENS_TAIL)}
    ids["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
    return ids


def make_tokenizer_dir(
    path: str | os.PathLike, *, vocab_size: int = 600, min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 64 * 28 * 28,
) -> dict[str, int]:
    """Write a tiny Qwen2.5-VL-style tokenizer and image-processor config into `path`.

    Files: tokenizer.json (byte-level BPE trained on a small maths corpus, Qwen2 pre-tokenizer,
    Qwen2.5-VL's added tokens), tokenizer_config.json (with the Qwen2-VL chat template) and
    preprocessor_config.json (Qwen2VLImageProcessor with small min/max pixels). Returns
    `tiny_token_ids(vocab_size)`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(_tiny_tokenizer_json(vocab_size))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 32768,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "resample": 3,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return tiny_token_ids(vocab_size)


INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                   "<box>", "</box>", "<video>")
# The HF-format InternVL chat template (as the -hf hub repos ship it): one <IMG_CONTEXT> per image.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_internvl_tokenizer_dir(path: str | os.PathLike, *, tile: int, tokens_per_tile: int,
                                max_patches: int = 6, vocab_size: int = 600) -> dict[str, int]:
    """Write an InternVL -hf style tokenizer (the tiny Qwen BPE plus InternVL's added tokens),
    chat template, preprocessor_config.json (GotOcr2, `tile` px tiles, 1..max_patches) and
    processor_config.json into `path`. Returns token ids by name and "vocab_size" (the
    tokenizer's size, added tokens included)."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(path)
    make_tokenizer_dir(path, vocab_size=vocab_size)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in INTERNVL_TOKENS])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>",
                                 "video_token": "<video>"},
    }, indent=2))
    (path / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": False,  # as on the hub; InternVLProcessor passes True anyway
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "max_patches": max_patches,
        "min_patches": 1,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": tile, "width": tile},
    }, indent=2))
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile}))
    ids = {t: tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>",
                                                  *INTERNVL_TOKENS)}
    ids["vocab_size"] = tokenizer.get_vocab_size()
    return ids


def tiny_hf_config(**overrides: Any):
    """A tiny transformers `Qwen2_5_VLConfig` matching `make_tokenizer_dir`'s tokenizer.

    Vision: depth 4, hidden 32, 2 heads, full attention in blocks 1 and 3, window 56 px (2x2 merged
    units per window). Text: hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, mrope_section
    (2, 3, 3). initializer_range 0.5 so that logits are not near-constant. Overrides: any
    top-level field (e.g. tie_word_embeddings), `vision_config={...}` / `text_config={...}`
    merged into the defaults, or a bare name of a vision field (window_size, depth,
    fullatt_block_indexes, ...) or text field (num_hidden_layers, vocab_size, ...).
    """
    from transformers import Qwen2_5_VLConfig

    ids = tiny_token_ids()
    initializer_range = overrides.pop("initializer_range", 0.5)
    vision = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 56,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1, 3],
        "initializer_range": initializer_range,
    }
    text = {
        "vocab_size": ids["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "mrope_section": [2, 3, 3]},
        "initializer_range": initializer_range,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision.update(overrides.pop("vision_config", {}))
    text.update(overrides.pop("text_config", {}))
    top = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "initializer_range": initializer_range,
    }
    for key, value in overrides.items():
        if key in top:
            top[key] = value
        elif key in vision:
            vision[key] = value
        elif key in text:
            text[key] = value
        else:
            raise TypeError(f"tiny_hf_config: unknown override {key!r}")
    if vision["out_hidden_size"] != text["hidden_size"]:
        vision["out_hidden_size"] = text["hidden_size"]
    text["tie_word_embeddings"] = top["tie_word_embeddings"]
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **top)


def make_hf_model_dir(
    path: str | os.PathLike, *, tie_word_embeddings: bool = False, seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Save a random float32 Qwen2_5_VLForConditionalGeneration (`tiny_hf_config`) with the tiny
    tokenizer and preprocessor config into `path`: a complete HF checkpoint directory.

    RMSNorm gains are drawn from U(0.5, 1.5) and every bias from N(0, 0.1^2), so that a port that
    ignores a gain or a bias fails parity tests. Needs torch.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    config = tiny_hf_config(tie_word_embeddings=tie_word_embeddings, **config_overrides)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    model.save_pretrained(path)
    make_tokenizer_dir(path)
    return path


def draw_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic picture of random rectangles, ellipses and lines (then converted to
    `mode`, e.g. "RGBA" with a random alpha channel, "L" or "P")."""
    rng = np.random.default_rng(seed)
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, max(width, 2), 2).tolist())
        y0, y1 = sorted(rng.integers(0, max(height, 2), 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))
    # Pixel noise so that resampling differences show up in every patch.
    noise = rng.integers(-12, 13, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image.putalpha(Image.fromarray(alpha, "L"))
        return image
    return image if mode == "RGB" else image.convert(mode)


def hf_reference_processor(path: str | os.PathLike, padding_side: str = "right"):
    """transformers' own Qwen2_5_VLProcessor for a directory, without its video processor (which
    needs torchvision): the reference our processing is compared with. Needs transformers."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    return ImageOnlyProcessor(Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer)
