"""InternVL2.5 prompts: dynamic tiling, image-token expansion, tokenisation and collation, as
transformers' InternVLProcessor with its GotOcr2 image processor (PIL backend).

Tiling (GotOcr2ImageProcessorPil with crop_to_patches=True, which InternVLProcessor always asks
for): convert to RGB compositing transparency onto white -> choose a grid of c x r tiles,
min_tiles <= c*r <= max_tiles, whose aspect ratio is closest to the image's (ties go to the later
grid in order of tile count while the image covers more than half of the grid) -> PIL resize of
the whole image to (c*S, r*S) with the configured filter -> row-major S x S crops -> plus, when
there is more than one tile, a thumbnail (the whole image resized to S x S) -> float64 * scale cast
to float32 -> (x - mean) / std in float32. Every step here does the same arithmetic.

Prompt: the chat template renders one `<IMG_CONTEXT>` per image item; the processor replaces
the i-th by `<img>` + `<IMG_CONTEXT>` * (tokens_per_tile * tiles of image i) + `</img>` and
tokenises the result. tokens_per_tile = (image_size / patch_size)**2 * downsample_ratio**2 of the
model's config.json (256 for 448-pixel tiles). A prompt without images is plain text: no tiles.

    processor = InternVLPromptProcessor.from_pretrained(model_dir, max_tiles_per_prompt=13)
    rows = [prompt_row(processor.encode(question=q, images=[img], system=SYSTEM, name=rid),
                       model_config) for ...]
    batch = collate_prompts(rows, Buckets(lengths=(512, 4096), patches=(0, 13)),
                            pad_token_id=processor.pad_token_id)

Rows are independent (like Qwen2.5-VL's, processing/qwen_rows.py): `collate_prompts` pads them to
a length bucket and a tile bucket (data.patch_buckets counts tiles for InternVL).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eureka_jax.batch import Buckets, PromptBatch
from eureka_jax.errors import InputError
from eureka_jax.models.internvl import InternVisionInputs
from eureka_jax.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb
from eureka_jax.processing.prompt import (
    ImageSource,
    _read_chat_template,
    message_images,
    render_chat,
)

# The special tokens of InternVL tokenizers (the HF-format ones name them in tokenizer_config.json
# "extra_special_tokens": start_image_token, end_image_token, context_image_token).
START_IMAGE = "<img>"
END_IMAGE = "</img>"
IMAGE_CONTEXT = "<IMG_CONTEXT>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE_FILTERS = {int(f) for f in Image.Resampling}


# ----------------------------------------------------------------------------- tiling


@dataclasses.dataclass(frozen=True)
class TileSettings:
    """What GotOcr2ImageProcessorPil does to an image under InternVLProcessor. The defaults are
    that class's defaults (what an empty preprocessor_config.json gives); InternVL checkpoints
    set tile_size=448 and the ImageNet mean/std (`INTERNVL_TILES`)."""

    tile_size: int = 384  # S: preprocessor_config.json "size" {"height": S, "width": S}
    min_tiles: int = 1  # "min_patches"
    max_tiles: int = 12  # "max_patches" (max_dynamic_patch of the original InternVL code)
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def validate(self, where: str) -> None:
        if self.tile_size < 1:
            raise InputError(f"{where}: tile size {self.tile_size} must be >= 1 pixel")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise InputError(
                f"{where}: min_patches={self.min_tiles} and max_patches={self.max_tiles} must "
                "satisfy 1 <= min_patches <= max_patches"
            )
        if self.resample not in _RESAMPLE_FILTERS:
            raise InputError(f"{where}: resample={self.resample} is not a PIL filter "
                             f"({sorted(_RESAMPLE_FILTERS)}); InternVL uses 3 (bicubic)")
        for field, values in (("image_mean", self.image_mean), ("image_std", self.image_std)):
            if len(values) != 3:
                raise InputError(f"{where}: {field} must have 3 values (R, G, B), got {values}")
        if min(self.image_std) <= 0:
            raise InputError(f"{where}: image_std {self.image_std} must be positive")

    def tiles_for(self, height: int, width: int) -> int:
        """Number of tiles (thumbnail included) of a height x width image."""
        columns, rows = tile_grid(height, width, self.tile_size, self.min_tiles, self.max_tiles)
        return columns * rows + (columns * rows > 1)


INTERNVL_TILES = TileSettings(tile_size=448, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def tile_grid(height: int, width: int, tile_size: int, min_tiles: int, max_tiles: int,
              ) -> tuple[int, int]:
    """(columns, rows) of the tile grid, as GotOcr2's get_optimal_tiled_canvas chooses it.

    Candidates are all c x r with min_tiles <= c*r <= max_tiles, visited in order of c*r (for
    equal counts, by increasing c). The first one with the smallest |w/h - c/r| wins, except that
    a later candidate with exactly the same difference replaces it while the image's area exceeds
    half the area of that candidate's tiles (more tiles for big images, not for small ones).
    """
    grids = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
         if min_tiles <= c * r <= max_tiles),
        key=lambda grid: grid[0] * grid[1],
    )
    aspect_ratio = width / height
    area = width * height
    best_diff, best = math.inf, (1, 1)
    for columns, rows in grids:
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best_diff, best = diff, (columns, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def tile_image(image: Image.Image, settings: TileSettings = INTERNVL_TILES, *,
               name: str = "image") -> np.ndarray:
    """One image -> tiles_NxCxSxS float32 (C = 3 RGB channels), equal to the pixel_values
    GotOcr2ImageProcessorPil gives InternVLProcessor: c*r row-major tiles, then the thumbnail
    when c*r > 1."""
    rgb = to_rgb(image)
    if rgb.width < 1 or rgb.height < 1:
        raise InputError(f"{name} has size {rgb.width}x{rgb.height}: it is empty; drop the record")
    s = settings.tile_size
    columns, rows = tile_grid(rgb.height, rgb.width, s, settings.min_tiles, settings.max_tiles)
    resized = np.asarray(rgb.resize((columns * s, rows * s), resample=settings.resample))
    # (rows, S, columns, S, C) -> (rows, columns, C, S, S): row-major tiles, channels first.
    tiles = resized.reshape(rows, s, columns, s, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, s, s)
    if columns * rows > 1:
        thumbnail = np.asarray(rgb.resize((s, s), resample=settings.resample))
        tiles = np.concatenate([tiles, thumbnail.transpose(2, 0, 1)[None]])
    tiles_NxCxSxS = (tiles.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean_C11 = np.asarray(settings.image_mean, dtype=np.float32)[:, None, None]
    std_C11 = np.asarray(settings.image_std, dtype=np.float32)[:, None, None]
    return (tiles_NxCxSxS - mean_C11) / std_C11


# ----------------------------------------------------------------------------- model directory


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({e}); restore it from the base model"
                         ) from e


def read_tile_settings(path: Path) -> TileSettings:
    """TileSettings from a model directory's preprocessor_config.json, as
    GotOcr2ImageProcessorPil.from_pretrained reads it (missing keys take the class defaults).
    Its "crop_to_patches" is ignored because InternVLProcessor always passes True."""
    config_path = path / "preprocessor_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    defaults = TileSettings()
    unsupported = {k: config[k] for k in ("do_rescale", "do_normalize", "do_convert_rgb")
                   if config.get(k) is False}
    if unsupported:
        raise InputError(f"{config_path}: unsupported image processor settings {unsupported}; "
                         "only rescaled, normalised RGB tiles (InternVL's settings) are "
                         "implemented")
    size = config.get("size") or {"height": defaults.tile_size, "width": defaults.tile_size}
    if set(size) != {"height", "width"} or size["height"] != size["width"]:
        raise InputError(f"{config_path}: 'size' is {size}; InternVL tiles are square, give "
                         "{\"height\": S, \"width\": S} with S the vision tower's image size")
    settings = TileSettings(
        tile_size=int(size["height"]),
        min_tiles=int(config.get("min_patches", defaults.min_tiles)),
        max_tiles=int(config.get("max_patches", defaults.max_tiles)),
        resample=int(config.get("resample", defaults.resample)),
        rescale_factor=float(config.get("rescale_factor", defaults.rescale_factor)),
        image_mean=tuple(config.get("image_mean", defaults.image_mean)),
        image_std=tuple(config.get("image_std", defaults.image_std)),
    )
    if settings.max_tiles == 1 and config.get("do_resize") is False:
        raise InputError(f"{config_path}: do_resize=false with max_patches=1 keeps the image's own "
                         "size, which the vision tower cannot take: set do_resize to true")
    settings.validate(str(config_path))
    return settings


def _pair(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int)
                                                                    for v in value):
        return int(value[0]), int(value[1])
    raise InputError(f"{where} is {value!r}: give an integer or [height, width]")


def read_tokens_per_tile(path: Path) -> tuple[int, int]:
    """(tokens per tile, vision image size) from config.json: (image_size / patch_size)**2 *
    downsample_ratio**2. Reads the HF layout (vision_config.image_size / patch_size as [h, w])
    and the original one (force_image_size, integers)."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path} does not exist: the tokens per image tile come from the "
                         "model config (vision_config.image_size, patch_size, downsample_ratio); "
                         "copy config.json from the base model")
    config = _read_json(config_path)
    vision = config.get("vision_config")
    if (not isinstance(vision, dict) or "patch_size" not in vision
            or "downsample_ratio" not in config):
        raise InputError(f"{config_path}: needs vision_config.image_size, vision_config.patch_size "
                         "and downsample_ratio (an InternVL config)")
    size_key = "force_image_size" if config.get("force_image_size") else "image_size"
    image_h, image_w = _pair(config.get("force_image_size") or vision.get("image_size"),
                             f"{config_path} {size_key}")
    patch_h, patch_w = _pair(vision["patch_size"], f"{config_path} vision_config.patch_size")
    ratio = float(config["downsample_ratio"])
    if image_h != image_w or image_h % patch_h or image_w % patch_w:
        raise InputError(f"{config_path}: image size {image_h}x{image_w} must be square and a "
                         f"multiple of the patch size {patch_h}x{patch_w}")
    grid_h, grid_w = image_h // patch_h, image_w // patch_w
    tokens = grid_h * grid_w * ratio**2
    if tokens != int(tokens) or tokens < 1:
        raise InputError(f"{config_path}: downsample_ratio={ratio} does not divide the "
                         f"{grid_h}x{grid_w} patch grid into whole tokens")
    declared = config.get("image_seq_length")
    if declared is not None and declared != int(tokens):
        raise InputError(f"{config_path}: image_seq_length={declared} but (image_size / "
                         f"patch_size)**2 * downsample_ratio**2 = {int(tokens)}: fix one of them")
    return int(tokens), image_h


def _special_token(tokenizer, attribute: str, default: str) -> str:
    """The tokenizer's named InternVL token (HF-format tokenizer_config.json extra_special_tokens)
    or InternVL's fixed spelling for tokenizers without the names (original-format repos)."""
    try:
        value = getattr(tokenizer, attribute)
    except AttributeError:
        return default
    return str(value) if value else default


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class InternVLEncodedPrompt:
    """One tokenised InternVL prompt and its images' tiles."""

    input_ids: np.ndarray  # (T,) int32, image tokens expanded
    token_source: np.ndarray  # (T,) int32: k for the k-th <IMG_CONTEXT>, -1 elsewhere
    tiles: np.ndarray  # (N, 3, S, S) float32: every image's tiles in prompt order
    tiles_per_image: tuple[int, ...]  # one entry per image, thumbnail included
    text: str  # the rendered chat template, before image-token expansion

    @property
    def num_tiles(self) -> int:
        return int(sum(self.tiles_per_image))


class InternVLPromptProcessor:
    """Tokenizer + tile settings + chat template of an InternVL2.5 checkpoint directory.

    max_tiles_per_prompt (the largest of data.patch_buckets, which count tiles for InternVL)
    bounds the tiles of all of a prompt's images together: the largest static tile dimension I
    of a device batch. None = no bound.
    """

    def __init__(self, tokenizer, tiles: TileSettings, chat_template: str, tokens_per_tile: int,
                 *, max_tiles_per_prompt: int | None = None, stop_token_ids: Sequence[int] = ()):
        if max_tiles_per_prompt is not None and max_tiles_per_prompt < 0:
            raise InputError(f"max_tiles_per_prompt={max_tiles_per_prompt} must be >= 0")
        self.tokenizer = tokenizer
        self.tiles = tiles
        self.chat_template = chat_template
        self.tokens_per_tile = int(tokens_per_tile)
        self.max_tiles_per_prompt = max_tiles_per_prompt
        self.start_image_token = _special_token(tokenizer, "start_image_token", START_IMAGE)
        self.end_image_token = _special_token(tokenizer, "end_image_token", END_IMAGE)
        self.image_token = _special_token(tokenizer, "context_image_token", IMAGE_CONTEXT)
        self.start_image_token_id = self._token_id(self.start_image_token)
        self.end_image_token_id = self._token_id(self.end_image_token)
        self.image_token_id = self._token_id(self.image_token)
        if tokenizer.pad_token_id is None:
            raise InputError("the tokenizer has no pad token: set pad_token in "
                             "tokenizer_config.json (InternVL uses <|endoftext|> or </s>)")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids) or (
            int(tokenizer.eos_token_id),)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if (token_id is None or token_id == self.tokenizer.unk_token_id
                or token not in self.tokenizer.get_added_vocab()):
            raise InputError(f"the tokenizer does not treat {token} as one special token: use an "
                             "InternVL tokenizer (its added tokens include <img>, </img>, "
                             "<IMG_CONTEXT>)")
        return int(token_id)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, max_tiles_per_prompt: int | None = None,
                        max_tiles_per_image: int | None = None) -> InternVLPromptProcessor:
        """Load from a local HF directory: tokenizer, preprocessor_config.json (tiles),
        config.json (tokens per tile, which processor_config.json's image_seq_length must equal
        when present), chat template, and stop ids from generation_config.json's eos_token_id.
        max_tiles_per_image overrides preprocessor_config.json's max_patches."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise InputError(f"model directory {path} does not exist")
        tiles = read_tile_settings(path)
        if max_tiles_per_image is not None:
            tiles = dataclasses.replace(tiles, max_tiles=max_tiles_per_image)
            tiles.validate(f"max_tiles_per_image={max_tiles_per_image}")
        tokens_per_tile, image_size = read_tokens_per_tile(path)
        if tiles.tile_size != image_size:
            raise InputError(
                f"{path / 'preprocessor_config.json'}: tile size {tiles.tile_size} but the vision "
                f"tower of {path / 'config.json'} takes {image_size}-pixel images: make 'size' "
                f"{{\"height\": {image_size}, \"width\": {image_size}}}"
            )
        processor_config = path / "processor_config.json"
        if processor_config.is_file():
            declared = _read_json(processor_config).get("image_seq_length")
            if declared is not None and declared != tokens_per_tile:
                raise InputError(
                    f"{processor_config}: image_seq_length={declared} but config.json gives "
                    f"{tokens_per_tile} tokens per tile ((image_size / patch_size)**2 * "
                    "downsample_ratio**2): set image_seq_length to it"
                )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        stop: list[int] = []
        generation_config = path / "generation_config.json"
        if generation_config.is_file():
            eos = _read_json(generation_config).get("eos_token_id") or []
            stop = [eos] if isinstance(eos, int) else list(eos)
        return cls(tokenizer, tiles, _read_chat_template(path, tokenizer), tokens_per_tile,
                   max_tiles_per_prompt=max_tiles_per_prompt, stop_token_ids=stop)

    @staticmethod
    def build_messages(question: str, num_images: int = 1, system: str | None = None,
                       images: Sequence[ImageSource] | None = None) -> list[dict[str, Any]]:
        """Optional system turn, then a user turn with the images before the question text.
        Without `images`, the items are bare {"type": "image"} placeholders."""
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

    def image_tokens(self, num_tiles: int) -> str:
        """What one image of `num_tiles` tiles becomes in the text."""
        return (self.start_image_token + self.image_token * (self.tokens_per_tile * num_tiles)
                + self.end_image_token)

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
    ) -> InternVLEncodedPrompt:
        """Encode chat `messages` (image items carry a PIL image, path or bytes under "image"),
        or `question` + `images` (+ `system`) laid out by `build_messages`. `name` identifies
        the record in error messages."""
        if (messages is None) == (question is None):
            raise ValueError("pass either messages or question")
        if messages is None:
            messages = self.build_messages(question, system=system, images=list(images))
        pil_images = message_images(messages, name)
        text = self.render(messages, add_generation_prompt)
        placeholders = text.count(self.image_token)
        if placeholders != len(pil_images):
            raise InputError(
                f"{name}: the rendered prompt has {placeholders} {self.image_token} placeholders "
                f"for {len(pil_images)} images; give each image exactly one image content item "
                f"(type 'image') and remove any literal '{self.image_token}' from the text"
            )

        per_image = [tile_image(image, self.tiles, name=f"{name} image {i}")
                     for i, image in enumerate(pil_images)]
        tiles_per_image = tuple(len(t) for t in per_image)
        budget = self.max_tiles_per_prompt
        if budget is not None and sum(tiles_per_image) > budget:
            sizes = ", ".join(f"image {i} ({im.width}x{im.height}): {n}" for i, (im, n)
                              in enumerate(zip(pil_images, tiles_per_image, strict=True)))
            raise InputError(
                f"{name}: its images need {sum(tiles_per_image)} tiles ({sizes}) but "
                f"the largest tile bucket (data.patch_buckets) is {budget}: raise it, lower the "
                f"tiles per image (data.max_tiles, now max_patches={self.tiles.max_tiles}), or "
                "drop the record"
            )

        replacements = iter([self.image_tokens(n) for n in tiles_per_image])
        expanded = re.sub(re.escape(self.image_token), lambda _: next(replacements), text)
        input_ids = np.asarray(self.tokenizer(expanded)["input_ids"], dtype=np.int32)

        is_context = input_ids == self.image_token_id
        expected = self.tokens_per_tile * sum(tiles_per_image)
        if int(is_context.sum()) != expected:
            raise InputError(
                f"{name}: {int(is_context.sum())} {self.image_token} tokens after tokenisation but "
                f"the images' {sum(tiles_per_image)} tiles need {expected}; the tokenizer must "
                f"treat {self.image_token} as one special token"
            )
        if max_length is not None and len(input_ids) > max_length:
            raise InputError(
                f"{name}: prompt has {len(input_ids)} tokens ({expected} of them image tokens) but "
                f"the maximum prompt length is {max_length}: raise the prompt length or lower "
                "the tiles per image"
            )
        token_source = np.full(input_ids.shape, -1, dtype=np.int32)
        token_source[is_context] = np.arange(expected, dtype=np.int32)
        s = self.tiles.tile_size
        tiles = (np.concatenate(per_image) if per_image
                 else np.zeros((0, 3, s, s), dtype=np.float32))
        return InternVLEncodedPrompt(input_ids, token_source, tiles, tiles_per_image, text)


# ----------------------------------------------------------------------------- prompt rows


@dataclasses.dataclass(frozen=True)
class InternVLPromptRow:
    """One InternVL prompt laid out for the model, unpadded (host NumPy): the family's prompt row
    (eureka_jax/families/internvl.py)."""

    input_ids_T: np.ndarray  # int32, image tokens expanded
    positions_3xT: np.ndarray  # int32: 0..T-1 in three equal rows (1-D rotary)
    next_position: int  # position of the first generated token (= T)
    token_source_T: np.ndarray  # int32: k for the k-th <IMG_CONTEXT>, else -1
    tiles_IxCxSxS: np.ndarray  # float32: the prompt's tiles in order

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids_T)

    @property
    def num_patches(self) -> int:
        """The vision size a patch bucket bounds: tiles, for InternVL."""
        return len(self.tiles_IxCxSxS)


def prompt_row(encoded: InternVLEncodedPrompt, config, *, name: str = "prompt",
               ) -> InternVLPromptRow:
    """The row of an encoded prompt, checked against the model config (tile side, tokens per
    tile)."""
    n = len(encoded.input_ids)
    side = config.vision.image_size
    if encoded.num_tiles and encoded.tiles.shape[-1] != side:
        raise InputError(f"{name}: tiles of {encoded.tiles.shape[-1]} px but the vision tower "
                         f"takes {side} px: encode with the model directory's processor")
    contexts = int((encoded.token_source >= 0).sum())
    if contexts != encoded.num_tiles * config.tokens_per_tile:
        raise InputError(f"{name}: {contexts} image tokens for {encoded.num_tiles} tiles of "
                         f"{config.tokens_per_tile} tokens each: encode with the model "
                         "directory's processor")
    return InternVLPromptRow(
        input_ids_T=np.asarray(encoded.input_ids, np.int32),
        positions_3xT=np.broadcast_to(np.arange(n, dtype=np.int32), (3, n)).copy(),
        next_position=n,
        token_source_T=np.asarray(encoded.token_source, np.int32),
        tiles_IxCxSxS=np.asarray(encoded.tiles, np.float32),
    )


def collate_prompts(rows: Sequence[InternVLPromptRow], buckets: Buckets, *, pad_token_id: int,
                    prompt_keys: Sequence[int] | None = None) -> PromptBatch:
    """Left-pad the rows to a length bucket and their tiles to a tile bucket (buckets.patches:
    tiles per prompt for InternVL; 0 = a text-only program). NumPy."""
    if not rows:
        raise InputError("cannot collate an empty batch of prompts")
    rows = list(rows)
    length, budget = buckets.length_for(rows), buckets.patches_for(rows)
    b = len(rows)
    input_ids = np.full((b, length), pad_token_id, dtype=np.int32)
    mask = np.zeros((b, length), dtype=bool)
    positions = np.zeros((3, b, length), dtype=np.int32)
    sources = np.full((b, length), -1, dtype=np.int32)
    for i, row in enumerate(rows):
        n = row.num_tokens
        input_ids[i, length - n:] = row.input_ids_T
        mask[i, length - n:] = True
        positions[:, i, length - n:] = row.positions_3xT
        sources[i, length - n:] = row.token_source_T
    vision = None
    if budget:
        shapes = {row.tiles_IxCxSxS.shape[1:] for row in rows}
        if len(shapes) > 1:
            raise InputError(f"prompts with different tile shapes {sorted(shapes)}: encode the "
                             "batch with one processor")
        channels, side, _ = shapes.pop()
        pixels = np.zeros((b, budget, channels, side, side), dtype=np.float32)
        valid = np.zeros((b, budget), dtype=bool)
        for i, row in enumerate(rows):
            pixels[i, :row.num_patches] = row.tiles_IxCxSxS
            valid[i, :row.num_patches] = True
        vision = InternVisionInputs(pixels_BxIxCxSxS=pixels, tile_valid_BxI=valid)
    keys = np.arange(b) if prompt_keys is None else np.asarray(prompt_keys)
    return PromptBatch(
        input_ids_BxT=input_ids,
        attention_mask_BxT=mask,
        positions_3xBxT=positions,
        next_position_B=mask.sum(axis=1).astype(np.int32),
        prompt_key_B=keys.astype(np.uint32),
        token_source_BxT=sources,
        vision=vision,
    )


def prompt_rows(batch: PromptBatch, config) -> list[InternVLPromptRow]:
    """The rows of a NumPy PromptBatch without their padding: the inverse of `collate_prompts`
    (the tokens its attention mask marks, on either side; the valid tiles)."""
    side = config.vision.image_size
    rows = []
    for b in range(len(batch.input_ids_BxT)):
        valid_T = np.asarray(batch.attention_mask_BxT[b]).astype(bool)
        if batch.vision is None:
            tiles = np.zeros((0, config.vision.num_channels, side, side), np.float32)
        else:
            keep = np.asarray(batch.vision.tile_valid_BxI[b]).astype(bool)
            tiles = np.asarray(batch.vision.pixels_BxIxCxSxS[b])[keep]
        rows.append(InternVLPromptRow(
            input_ids_T=np.asarray(batch.input_ids_BxT[b])[valid_T],
            positions_3xT=np.asarray(batch.positions_3xBxT[:, b])[:, valid_T],
            next_position=int(batch.next_position_B[b]),
            token_source_T=np.asarray(batch.token_source_BxT[b])[valid_T],
            tiles_IxCxSxS=tiles,
        ))
    return rows
