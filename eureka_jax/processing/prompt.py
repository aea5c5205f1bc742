"""Chat prompts for Qwen2.5-VL: template, image-pad expansion and tokenisation, as HF's processor.

`Qwen2_5_VLProcessor.__call__` renders nothing itself: callers render the chat template (one
`<|vision_start|><|image_pad|><|vision_end|>` per image), then the processor replaces the i-th
`<|image_pad|>` of the text with grid_t*grid_h*grid_w / merge_size**2 copies of itself and
tokenises the result. `QwenVLProcessor.encode` does both steps in one call and checks the counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eureka_jax.errors import InputError
from eureka_jax.processing.image import ImageSettings, load_image, preprocess_with

IMAGE_TOKEN = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

ImageSource = Image.Image | str | os.PathLike | bytes


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One tokenised prompt and its images' patches in HF order (processing/qwen_rows.py lays
    them out for the model)."""

    input_ids: np.ndarray  # (T,) int32, image pads expanded
    image_grid_thw: np.ndarray  # (I, 3) int32, one row per image in prompt order
    patches: list[np.ndarray]  # I arrays (grid_t*grid_h*grid_w, C) float32
    text: str  # the rendered chat template, before image-pad expansion

    @property
    def num_patches(self) -> int:
        return int(self.image_grid_thw.prod(axis=1).sum())


def _is_image_item(item: Any) -> bool:
    """The chat template's test for an image content item."""
    return isinstance(item, dict) and (
        item.get("type") == "image" or "image" in item or "image_url" in item
    )


def _is_video_item(item: Any) -> bool:
    return isinstance(item, dict) and (item.get("type") == "video" or "video" in item)


def render_chat(tokenizer, chat_template: str, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = True) -> str:
    """The chat template's text, one image placeholder per image item (image objects are
    replaced by a bare marker: the template only tests for the item)."""
    stripped = [
        {**message, "content": [{"type": "image"} if _is_image_item(item) else item
                                for item in message["content"]]}
        if isinstance(message.get("content"), list) else message
        for message in messages
    ]
    return tokenizer.apply_chat_template(
        stripped, chat_template=chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def message_images(messages: Sequence[dict[str, Any]], name: str) -> list[Image.Image]:
    """The PIL images of a chat's image items, in order (paths and bytes are loaded); a video
    item is an InputError naming the record."""
    images = []
    for message in messages:
        content = message.get("content")
        for item in content if isinstance(content, list) else ():
            if _is_video_item(item):
                raise InputError(f"{name}: video inputs are not supported; drop the record")
            if _is_image_item(item):
                images.append(_image_of(item, name, len(images)))
    return images


def _image_of(item: dict[str, Any], name: str, index: int) -> Image.Image:
    value = item.get("image")
    if value is None and "image_url" in item:
        url = item["image_url"]
        value = url.get("url") if isinstance(url, dict) else url
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        return load_image(value, name=f"{name} image {index} (bytes)")
    if isinstance(value, (str, os.PathLike)):
        return load_image(value, name=f"{name} image {index} ({os.fspath(value)})")
    raise InputError(f"{name} image {index}: image content item has no image (got "
                     f"{type(value).__name__}); put a path, bytes or PIL image under 'image'")


def _read_image_settings(path: Path, min_pixels: int | None, max_pixels: int | None):
    """Image settings as Qwen2VLImageProcessor reads preprocessor_config.json: `size`
    {shortest_edge, longest_edge} first, then top-level min_pixels / max_pixels override it."""
    config: dict[str, Any] = {}
    config_path = path / "preprocessor_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
    defaults = ImageSettings()
    size = config.get("size") or {}
    unsupported = {k: config[k] for k in ("do_resize", "do_rescale", "do_normalize",
                                          "do_convert_rgb") if config.get(k) is False}
    if config.get("resample", 3) != 3:
        unsupported["resample"] = config["resample"]
    if abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        unsupported["rescale_factor"] = config["rescale_factor"]
    if unsupported:
        raise InputError(f"{config_path}: unsupported image processor settings {unsupported}; "
                         "only the Qwen2-VL defaults (bicubic resize, 1/255, normalise) are "
                         "implemented")
    settings = ImageSettings(
        min_pixels=min_pixels or config.get("min_pixels") or size.get("shortest_edge")
        or defaults.min_pixels,
        max_pixels=max_pixels or config.get("max_pixels") or size.get("longest_edge")
        or defaults.max_pixels,
        patch_size=config.get("patch_size", defaults.patch_size),
        temporal_patch_size=config.get("temporal_patch_size", defaults.temporal_patch_size),
        merge_size=config.get("merge_size", defaults.merge_size),
        image_mean=tuple(config.get("image_mean", defaults.image_mean)),
        image_std=tuple(config.get("image_std", defaults.image_std)),
    )
    settings.validate(str(config_path))
    return settings


def _read_chat_template(path: Path, tokenizer) -> str:
    """The processor's template (chat_template.jinja / chat_template.json) as HF's processor
    prefers it, else the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise InputError(f"{path}: no chat template (chat_template.jinja, chat_template.json or "
                     "tokenizer_config.json 'chat_template'); copy one from the base model")


class QwenVLProcessor:
    """Tokenizer + image settings + chat template of a Qwen2.5-VL checkpoint directory."""

    def __init__(self, tokenizer, image_settings: ImageSettings, chat_template: str,
                 stop_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.image = image_settings
        self.chat_template = chat_template
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        self.vision_start_token_id = self._token_id(VISION_START)
        self.vision_end_token_id = self._token_id(VISION_END)
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids) or (
            int(tokenizer.eos_token_id),)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise InputError(f"tokenizer has no {token} token: use a Qwen2.5-VL tokenizer")
        return int(token_id)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> QwenVLProcessor:
        """Load from a local HF directory. min/max_pixels override preprocessor_config.json.
        Stop ids come from generation_config.json's eos_token_id when present."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise InputError(f"model directory {path} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        stop: list[int] = []
        generation_config = path / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id") or []
            stop = [eos] if isinstance(eos, int) else list(eos)
        return cls(tokenizer, _read_image_settings(path, min_pixels, max_pixels),
                   _read_chat_template(path, tokenizer), stop)

    @staticmethod
    def build_messages(question: str, num_images: int = 1, system: str | None = None,
                       images: Sequence[ImageSource] | None = None) -> list[dict[str, Any]]:
        """MM-Eureka's prompt: optional system turn, then a user turn with the images before the
        question text. Without `images`, the items are bare {"type": "image"} placeholders."""
        items = images if images is not None else [None] * num_images
        content: list[dict[str, Any]] = [
            {"type": "image"} if image is None else {"type": "image", "image": image}
            for image in items
        ]
        content.append({"type": "text", "text": question})
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        return messages

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               ) -> str:
        """The chat template's text, one image placeholder per image item."""
        return render_chat(self.tokenizer, self.chat_template, messages, add_generation_prompt)

    def encode(
        self,
        messages: Sequence[dict[str, Any]] | None = None,
        *,
        question: str | None = None,
        images: Sequence[ImageSource] = (),
        system: str | None = None,
        add_generation_prompt: bool = True,
        max_length: int | None = None,
        name: str = "prompt",
    ) -> EncodedPrompt:
        """Encode chat `messages` (image items carry a PIL image, path or bytes under "image"),
        or `question` + `images` (+ `system`) laid out by `build_messages`. `name` identifies
        the record in error messages."""
        if (messages is None) == (question is None):
            raise ValueError("pass either messages or question")
        if messages is None:
            messages = self.build_messages(question, system=system, images=list(images))
        pil_images = message_images(messages, name)
        text = self.render(messages, add_generation_prompt)

        patches, grids = [], []
        for i, image in enumerate(pil_images):
            patches_NxC, grid_thw = preprocess_with(self.image, image, name=f"{name} image {i}")
            patches.append(patches_NxC)
            grids.append(grid_thw)
        placeholders = text.count(IMAGE_TOKEN)
        if placeholders != len(pil_images):
            raise InputError(
                f"{name}: the rendered prompt has {placeholders} {IMAGE_TOKEN} placeholders for "
                f"{len(pil_images)} images; give each image exactly one image content item and "
                f"remove any literal '{IMAGE_TOKEN}' from the text"
            )
        merge_unit = self.image.merge_size**2
        repeats = iter([IMAGE_TOKEN * (int(np.prod(g)) // merge_unit) for g in grids])
        expanded = re.sub(re.escape(IMAGE_TOKEN), lambda _: next(repeats), text)
        input_ids = np.asarray(self.tokenizer(expanded)["input_ids"], dtype=np.int32)

        expected = sum(int(np.prod(g)) // merge_unit for g in grids)
        found = int((input_ids == self.image_token_id).sum())
        if found != expected:
            raise InputError(
                f"{name}: image features and image tokens do not match: {found} "
                f"{IMAGE_TOKEN} tokens after tokenisation but the images give {expected} merged "
                "patches; the tokenizer must treat <|image_pad|> as one special token"
            )
        if max_length is not None and len(input_ids) > max_length:
            raise InputError(
                f"{name}: prompt has {len(input_ids)} tokens ({expected} of them image tokens) but "
                f"the maximum prompt length is {max_length}: raise the prompt length or lower "
                "max_pixels"
            )
        grid_array = (np.stack(grids) if grids else np.zeros((0, 3))).astype(np.int32)
        return EncodedPrompt(input_ids, grid_array, patches, text)
