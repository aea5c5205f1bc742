"""Image loading and Qwen2-VL patch extraction, bit-exact to transformers' Qwen2VLImageProcessorPil.

The reference pipeline (transformers 5.23, default settings) is: convert to RGB compositing any
transparency onto white -> PIL bicubic resize to `smart_resize` dims -> float64 * (1/255) cast to
float32 -> (x - mean) / std in float32 with the CLIP mean/std -> patches in merge-block order,
each patch duplicated `temporal_patch_size` times. Every step below does the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eureka_jax.errors import InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """What Qwen2VLImageProcessor does to an image. Defaults are the processor class defaults;
    Qwen2.5-VL hub checkpoints set max_pixels=12845056 in preprocessor_config.json and MM-Eureka
    trains with min_pixels=4*28*28, max_pixels=640*28*28."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """C, the length of one flattened patch row: 3 * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def validate(self, where: str) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise InputError(
                f"{where}: min_pixels={self.min_pixels} and max_pixels={self.max_pixels} must "
                "satisfy 0 < min_pixels <= max_pixels"
            )
        if self.max_pixels < self.factor**2:
            raise InputError(
                f"{where}: max_pixels={self.max_pixels} is below one merged patch "
                f"({self.factor}x{self.factor}={self.factor**2} pixels): raise max_pixels"
            )


def load_image(source: str | os.PathLike | bytes, *, name: str | None = None) -> Image.Image:
    """Open an image file (path, `file://` URI or encoded bytes) and apply its EXIF orientation.

    The mode is kept (RGBA stays RGBA) so that `preprocess_image` composites transparency onto
    white like the HF image processor does for PIL inputs. (HF's own `load_image` would instead
    drop the alpha channel with `convert("RGB")`.) `name` labels the image in error messages.
    """
    if isinstance(source, (bytes, bytearray)):
        label = name or f"<{len(source)} bytes>"
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        text = os.fspath(source)
        path = Path(text[len("file://"):] if text.startswith("file://") else text)
        label = name or str(path)
        if not path.is_file():
            raise InputError(
                f"image {label}: file not found ({path}); check the path in the record, and that "
                "relative paths are relative to the data file's image root"
            )
        fp = path
    try:
        image = Image.open(fp)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(
            f"image {label}: cannot be decoded as an image ({type(e).__name__}: {e}); "
            "re-encode it as PNG or JPEG or drop the record"
        ) from e
    return ImageOps.exif_transpose(image)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280, *, name: str = "image",
) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min, max] pixels
    (approximately: very elongated images can exceed max_pixels because each side is at least
    `factor`), aspect ratio kept. Images smaller than `factor` are upscaled, not rejected;
    aspect ratios above 200 are rejected (as HF does, but with an InputError)."""
    if height <= 0 or width <= 0:
        raise InputError(f"{name} has size {width}x{height}: it is empty; drop the record")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"{name} is {width}x{height} pixels, aspect ratio {ratio:.1f} > {MAX_ASPECT_RATIO}, "
            "which Qwen2.5-VL's processor rejects: crop or pad it, or drop the record"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """HF's convert_to_rgb for PIL images: transparency is composited onto a white background."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(
    image: Image.Image,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    *,
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    image_std: tuple[float, ...] = OPENAI_CLIP_STD,
    name: str = "image",
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches_NxC float32, grid_thw (3,) int32), equal to Qwen2VLImageProcessorPil.

    N = grid_h * grid_w patch rows in HF's order (merge blocks of merge_size x merge_size patches,
    row-major over blocks), C = 3 * temporal_patch_size * patch_size**2 laid out as
    (channel, time, patch row, patch column). grid_thw = (1, grid_h, grid_w).
    """
    rgb = to_rgb(image)
    height, width = smart_resize(
        rgb.height, rgb.width, patch_size * merge_size, min_pixels, max_pixels, name=name
    )
    resized = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels_HxWxC = np.asarray(resized)
    pixels_HxWxC = (pixels_HxWxC.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    pixels_HxWxC = (pixels_HxWxC - mean) / std

    grid_h, grid_w = height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    blocks = pixels_HxWxC.reshape(grid_h // m, m, p, grid_w // m, m, p, 3)
    # -> (block row, block col, row in block, col in block, channel, pixel row, pixel col)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    blocks = np.broadcast_to(
        blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, p, p)
    )
    patches_NxC = np.ascontiguousarray(blocks).reshape(grid_h * grid_w, -1)
    return patches_NxC, np.array([1, grid_h, grid_w], dtype=np.int32)


def preprocess_with(settings: ImageSettings, image: Image.Image, *, name: str = "image"):
    """`preprocess_image` with the sizes and normalisation of `settings`."""
    return preprocess_image(
        image, settings.min_pixels, settings.max_pixels, settings.patch_size,
        settings.temporal_patch_size, settings.merge_size,
        image_mean=settings.image_mean, image_std=settings.image_std, name=name,
    )
