"""InternVL2.5 host preprocessing against transformers' InternVLProcessor and its GotOcr2 PIL
image processor.

Everything is local: the tokenizer is the tiny Qwen BPE of eureka_jax.testing with InternVL's added
tokens, images are drawn with PIL. Tiles are small (28 px, 7-px patches, downsample 0.5 -> 4
tokens per tile) except in the one test at InternVL's real 448-pixel tile size.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from eureka_jax.batch import Buckets
from eureka_jax.errors import InputError
from eureka_jax.processing.internvl import (
    INTERNVL_TILES,
    InternVLPromptProcessor,
    TileSettings,
    collate_prompts,
    prompt_row,
    prompt_rows,
    tile_grid,
    tile_image,
)
from eureka_jax.testing import (
    draw_image,
    make_internvl_tokenizer_dir,
    make_tokenizer_dir,
)

transformers = pytest.importorskip("transformers")

TILE, PATCH, TOKENS_PER_TILE = 28, 7, 4
SYSTEM = "You are a helpful assistant. Put the final answer in \\boxed{}."


def make_internvl_dir(path, *, tile=TILE, patch=PATCH, max_patches=6, image_seq_length=None):
    """A tokenizer + processor + config directory laid out like an InternVL -hf hub repo."""
    tokens = (tile // patch) ** 2 // 4
    make_internvl_tokenizer_dir(path, tile=tile, max_patches=max_patches,
                                tokens_per_tile=tokens if image_seq_length is None
                                else image_seq_length)
    (path / "config.json").write_text(json.dumps({
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_seq_length": tokens,
        "vision_config": {"image_size": [tile, tile], "patch_size": [patch, patch]},
        "text_config": {"model_type": "qwen2"},
    }))
    return path


def hf_internvl_processor(path):
    """transformers' own InternVLProcessor for the directory, without its video processor (which
    needs torchvision): attributes are inferred from __init__'s signature, so this subclass has
    only image_processor and tokenizer and HF's __init__ does the rest."""
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template,
                             **kwargs)

    seq = json.loads((path / "processor_config.json").read_text())["image_seq_length"]
    return ImageOnlyInternVLProcessor(
        GotOcr2ImageProcessorPil.from_pretrained(path), AutoTokenizer.from_pretrained(path),
        chat_template=(path / "chat_template.jinja").read_text(), image_seq_length=seq)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_internvl_dir(tmp_path_factory.mktemp("internvl"))


def test_tile_grid_matches_got_ocr2():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas,
    )

    sizes = [(h, w) for h in (1, 2, 3, 7, 13, 28, 30, 56, 57, 84, 100, 111, 200, 448, 449, 896,
                              1000, 1344, 2000) for w in (1, 5, 28, 56, 60, 112, 150, 448, 900,
                                                          1345, 3000)]
    for tile in (28, 448):
        for low, high in ((1, 1), (1, 4), (1, 6), (1, 12), (2, 9), (3, 3)):
            for h, w in sizes:
                assert tile_grid(h, w, tile, low, high) == get_optimal_tiled_canvas(
                    (h, w), (tile, tile), low, high), (h, w, tile, low, high)


def _hf_tiles(images, settings: TileSettings):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    processor = GotOcr2ImageProcessorPil(
        size={"height": settings.tile_size, "width": settings.tile_size},
        min_patches=settings.min_tiles, max_patches=settings.max_tiles,
        image_mean=list(settings.image_mean), image_std=list(settings.image_std),
        resample=settings.resample)
    out = processor(images, crop_to_patches=True, return_tensors="np")
    return np.asarray(out["pixel_values"]), list(np.asarray(out["num_patches"]))


IMAGES = {
    "square": (56, 56, "RGB"),
    "wide": (200, 50, "RGB"),
    "tall": (40, 170, "RGB"),
    "tiny": (3, 5, "RGB"),
    "big": (640, 480, "RGB"),
    "odd": (97, 61, "RGB"),
    "rgba": (90, 60, "RGBA"),
    "grey": (70, 45, "L"),
    "palette": (33, 80, "P"),
}


@pytest.mark.parametrize("label", sorted(IMAGES))
def test_tiles_bit_exact(label):
    width, height, mode = IMAGES[label]
    image = draw_image(width, height, seed=len(label), mode=mode)
    settings = dataclasses.replace(INTERNVL_TILES, tile_size=TILE, max_tiles=6)
    ours = tile_image(image, settings)
    theirs, counts = _hf_tiles([image], settings)
    assert counts == [len(ours)] == [settings.tiles_for(height, width)]
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (len(ours), 3, TILE, TILE)
    assert np.array_equal(ours, theirs), float(np.abs(ours - theirs).max())


def test_tiles_bit_exact_at_internvl_size():
    """448-pixel tiles, up to 12 per image, ImageNet mean/std (InternVL2.5's own settings)."""
    for width, height in ((1000, 700), (448, 448), (300, 1200), (2048, 1536)):
        image = draw_image(width, height, seed=width)
        ours = tile_image(image, INTERNVL_TILES)
        theirs, counts = _hf_tiles([image], INTERNVL_TILES)
        assert counts == [len(ours)]
        assert np.array_equal(ours, theirs), float(np.abs(ours - theirs).max())


@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 1), (2, 4), (1, 12)])
def test_tiles_bit_exact_other_tile_counts(min_tiles, max_tiles):
    settings = dataclasses.replace(INTERNVL_TILES, tile_size=TILE, min_tiles=min_tiles,
                                   max_tiles=max_tiles)
    for width, height in ((56, 56), (120, 33), (20, 90), (400, 300)):
        image = draw_image(width, height, seed=width + height)
        ours = tile_image(image, settings)
        theirs, counts = _hf_tiles([image], settings)
        assert counts == [len(ours)] == [settings.tiles_for(height, width)]
        assert np.array_equal(ours, theirs), float(np.abs(ours - theirs).max())


def test_tiles_bit_exact_palette_with_transparency_and_la():
    settings = dataclasses.replace(INTERNVL_TILES, tile_size=TILE)
    palette = draw_image(64, 40, seed=11).quantize(16)
    palette.info["transparency"] = 3
    la = draw_image(50, 75, seed=12, mode="RGBA").convert("LA")
    for image in (palette, la):
        ours = tile_image(image, settings)
        theirs, _ = _hf_tiles([image], settings)
        assert np.array_equal(ours, theirs), float(np.abs(ours - theirs).max())


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (TILE, TILE), (10, 20, 30, 0))
    tiles = tile_image(image, dataclasses.replace(INTERNVL_TILES, tile_size=TILE))
    white = (1 - np.asarray(INTERNVL_TILES.image_mean)) / np.asarray(INTERNVL_TILES.image_std)
    np.testing.assert_allclose(tiles[0, :, 0, 0], white, rtol=1e-6)


def _hf_encode(path, messages, images):
    hf = hf_internvl_processor(path)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = hf(images=images or None, text=[text], return_tensors="np")
    return text, out


def _pil_images(messages):
    return [item["image"] for m in messages if isinstance(m["content"], list)
            for item in m["content"] if item.get("type") == "image"]


@pytest.mark.parametrize("num_images", [0, 1, 2, 3])
def test_encode_equals_hf_processor(model_dir, num_images):
    processor = InternVLPromptProcessor.from_pretrained(model_dir)
    assert processor.tokens_per_tile == TOKENS_PER_TILE
    sizes = [(56, 56), (200, 50), (3, 5)][:num_images]
    images = [draw_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    messages = processor.build_messages("What is the area of the triangle?", system=SYSTEM,
                                        images=images)
    ours = processor.encode(messages, name="rec-1")
    text, theirs = _hf_encode(model_dir, messages, images)
    assert ours.text == text
    np.testing.assert_array_equal(ours.input_ids, theirs["input_ids"][0])
    assert ours.input_ids.dtype == np.int32
    tiles_per_image = [processor.tiles.tiles_for(h, w) for w, h in sizes]
    assert list(ours.tiles_per_image) == tiles_per_image
    if num_images:
        assert np.array_equal(ours.tiles, np.asarray(theirs["pixel_values"]))
    else:
        assert ours.tiles.shape == (0, 3, TILE, TILE) and "pixel_values" not in theirs
    ids = ours.input_ids
    assert (ids == processor.start_image_token_id).sum() == num_images
    assert (ids == processor.end_image_token_id).sum() == num_images
    context = ids == processor.image_token_id
    assert context.sum() == TOKENS_PER_TILE * sum(tiles_per_image)
    np.testing.assert_array_equal(ours.token_source[context], np.arange(context.sum()))
    assert (ours.token_source[~context] == -1).all()


def test_encode_question_form_equals_messages_form(model_dir):
    processor = InternVLPromptProcessor.from_pretrained(model_dir)
    image = draw_image(90, 60, seed=3, mode="RGBA")
    a = processor.encode(question="Find x.", images=[image], system=SYSTEM)
    b = processor.encode(processor.build_messages("Find x.", system=SYSTEM, images=[image]))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert np.array_equal(a.tiles, b.tiles)


def test_images_from_paths_and_bytes(model_dir, tmp_path):
    processor = InternVLPromptProcessor.from_pretrained(model_dir)
    image = draw_image(60, 40, seed=5)
    image.save(tmp_path / "a.png")
    from_path = processor.encode(question="q", images=[str(tmp_path / "a.png")])
    from_bytes = processor.encode(question="q", images=[(tmp_path / "a.png").read_bytes()])
    from_pil = processor.encode(question="q", images=[image])
    assert np.array_equal(from_path.tiles, from_pil.tiles)
    assert np.array_equal(from_bytes.tiles, from_pil.tiles)
    with pytest.raises(InputError, match="rec-9 image 0.*file not found"):
        processor.encode(question="q", images=[str(tmp_path / "missing.png")], name="rec-9")


def test_tile_budget_per_prompt(model_dir):
    processor = InternVLPromptProcessor.from_pretrained(model_dir, max_tiles_per_prompt=8)
    wide = draw_image(200, 50, seed=1)  # 4x1 grid + thumbnail = 5 tiles
    assert processor.encode(question="q", images=[wide]).num_tiles == 5
    with pytest.raises(InputError, match=r"rec-7: its images need 10 tiles \(image 0 \(200x50\): "
                       r"5, image 1 \(200x50\): 5\).*largest tile bucket \(data.patch_buckets\) "
                       r"is 8"):
        processor.encode(question="q", images=[wide, wide], name="rec-7")
    fewer = InternVLPromptProcessor.from_pretrained(model_dir, max_tiles_per_prompt=8,
                                                    max_tiles_per_image=2)
    assert fewer.encode(question="q", images=[wide, wide]).tiles_per_image == (3, 3)


def test_tokenizer_without_internvl_tokens(tmp_path):
    path = make_internvl_dir(tmp_path / "qwen")
    tiles = (path / "preprocessor_config.json").read_text()
    make_tokenizer_dir(path)  # the plain Qwen tokenizer: no <img>, </img>, <IMG_CONTEXT>
    (path / "preprocessor_config.json").write_text(tiles)
    with pytest.raises(InputError, match="does not treat <img> as one special token"):
        InternVLPromptProcessor.from_pretrained(path)


def test_placeholder_mismatch(model_dir):
    processor = InternVLPromptProcessor.from_pretrained(model_dir)
    with pytest.raises(InputError, match="rec-2: the rendered prompt has 2 <IMG_CONTEXT>"):
        processor.encode(question="see <IMG_CONTEXT>", images=[draw_image(30, 30)], name="rec-2")
    with pytest.raises(InputError, match="video inputs are not supported"):
        processor.encode([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])


def test_config_checks(tmp_path):
    bad_seq = make_internvl_dir(tmp_path / "seq", image_seq_length=16)
    with pytest.raises(InputError, match="processor_config.json: image_seq_length=16 but "
                       "config.json gives 4"):
        InternVLPromptProcessor.from_pretrained(bad_seq)
    mismatch = make_internvl_dir(tmp_path / "size")
    config = json.loads((mismatch / "preprocessor_config.json").read_text())
    config["size"] = {"height": 56, "width": 56}
    (mismatch / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="tile size 56 but the vision tower"):
        InternVLPromptProcessor.from_pretrained(mismatch)
    (mismatch / "config.json").unlink()
    with pytest.raises(InputError, match="config.json does not exist"):
        InternVLPromptProcessor.from_pretrained(mismatch)


def test_tokens_per_tile_at_internvl_size(tmp_path):
    path = make_internvl_dir(tmp_path / "real", tile=448, patch=14)
    processor = InternVLPromptProcessor.from_pretrained(path)
    assert processor.tokens_per_tile == 256
    config = json.loads((path / "config.json").read_text())
    # The original (trust_remote_code) layout: force_image_size and integer sizes.
    config.update(force_image_size=448, vision_config={"image_size": 448, "patch_size": 14})
    del config["image_seq_length"]
    (path / "config.json").write_text(json.dumps(config))
    assert InternVLPromptProcessor.from_pretrained(path).tokens_per_tile == 256


def _config(model_dir):
    """The model config for the directory's tile geometry (its config.json has no text model)."""
    from eureka_jax.models.internvl import InternViTConfig, InternVLConfig

    vision = InternViTConfig(image_size=TILE, patch_size=PATCH, hidden_size=32,
                             intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    return InternVLConfig(vision=vision, image_seq_length=TOKENS_PER_TILE)


def test_collate(model_dir):
    processor = InternVLPromptProcessor.from_pretrained(model_dir, max_tiles_per_prompt=8)
    config = _config(model_dir)
    prompts = [
        processor.encode(question="Find x.", images=[draw_image(200, 50, seed=1)]),
        processor.encode(question="What is 2^10?", system=SYSTEM),
        processor.encode(question="Two.", images=[draw_image(30, 30, seed=2),
                                                  draw_image(40, 80, seed=3)]),
    ]
    rows = [prompt_row(p, config, name=f"rec-{'abc'[i]}") for i, p in enumerate(prompts)]
    batch = collate_prompts(rows, Buckets(lengths=(16, 64, 128), patches=(0, 8)),
                            pad_token_id=processor.pad_token_id, prompt_keys=[4, 5, 6])
    lengths = [len(p.input_ids) for p in prompts]
    t = min(b for b in (16, 64, 128) if b >= max(lengths))
    assert batch.input_ids_BxT.shape == (3, t) and batch.input_ids_BxT.dtype == np.int32
    assert batch.attention_mask_BxT.dtype == bool
    assert batch.positions_3xBxT.shape == (3, 3, t) and batch.positions_3xBxT.dtype == np.int32
    pixels, valid = batch.vision.pixels_BxIxCxSxS, batch.vision.tile_valid_BxI
    assert pixels.shape == (3, 8, 3, TILE, TILE) and pixels.dtype == np.float32
    np.testing.assert_array_equal(batch.next_position_B, lengths)
    np.testing.assert_array_equal(batch.prompt_key_B, [4, 5, 6])
    for b, prompt in enumerate(prompts):
        n = lengths[b]
        np.testing.assert_array_equal(batch.input_ids_BxT[b, t - n:], prompt.input_ids)
        assert (batch.input_ids_BxT[b, : t - n] == processor.pad_token_id).all()
        np.testing.assert_array_equal(batch.attention_mask_BxT[b], np.arange(t) >= t - n)
        for axis in range(3):
            np.testing.assert_array_equal(batch.positions_3xBxT[axis, b, t - n:], np.arange(n))
            assert (batch.positions_3xBxT[axis, b, : t - n] == 0).all()
        np.testing.assert_array_equal(batch.token_source_BxT[b, t - n:], prompt.token_source)
        assert (batch.token_source_BxT[b, : t - n] == -1).all()
        k = prompt.num_tiles
        np.testing.assert_array_equal(valid[b], np.arange(8) < k)
        assert np.array_equal(pixels[b, :k], prompt.tiles)
        assert not pixels[b, k:].any()
        assert (batch.token_source_BxT[b] >= 0).sum() == TOKENS_PER_TILE * k
    assert not valid[1].any()  # the text-only prompt

    # prompt_rows undoes the padding.
    for ours, theirs in zip(prompt_rows(batch, config), rows, strict=True):
        for field in dataclasses.fields(theirs):
            np.testing.assert_array_equal(getattr(ours, field.name), getattr(theirs, field.name))

    with pytest.raises(InputError, match=r"batch row 0: patches \(tiles for InternVL\) per "
                       r"prompt 5 exceeds the largest bucket 4"):
        collate_prompts(rows, Buckets(lengths=(128,), patches=(0, 4)), pad_token_id=0)
    with pytest.raises(InputError, match="prompt length .* exceeds the largest bucket 8"):
        collate_prompts(rows, Buckets(lengths=(8,), patches=(0, 8)), pad_token_id=0)
    untokenised = dataclasses.replace(prompts[0], token_source=np.full_like(
        prompts[0].token_source, -1))
    with pytest.raises(InputError, match="rec-a: 0 image tokens for 5 tiles of 4 tokens each"):
        prompt_row(untokenised, config, name="rec-a")


def test_collate_text_only(model_dir):
    processor = InternVLPromptProcessor.from_pretrained(model_dir)
    rows = [prompt_row(processor.encode(question="What is 2^10?"), _config(model_dir))]
    batch = collate_prompts(rows, Buckets(lengths=(64,), patches=(0,)),
                            pad_token_id=processor.pad_token_id)
    assert batch.vision is None and (batch.token_source_BxT == -1).all()
