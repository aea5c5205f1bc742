"""eureka_jax.processing against the Hugging Face reference (transformers 5.23, torch CPU)."""

from __future__ import annotations

import functools
import io
import json
import types

import numpy as np
import pytest
from PIL import Image

from eureka_jax import testing
from eureka_jax.errors import InputError
from eureka_jax.processing import (
    QwenVLProcessor,
    gather_patches,
    image_token_sources,
    load_image,
    mrope_positions,
    next_bucket,
    preprocess_image,
    smart_resize,
    vision_layout,
)

MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    testing.make_tokenizer_dir(path, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return path


@pytest.fixture(scope="module")
def processor(tok_dir):
    return QwenVLProcessor.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf_processor(tok_dir):
    """Qwen2_5_VLProcessor without a video processor (torchvision is unavailable here)."""
    return testing.hf_reference_processor(tok_dir)


def hf_rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
    """Qwen2_5_VLModel.get_rope_index called on a stub holding only the config."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    stub = types.SimpleNamespace(config=testing.tiny_hf_config())
    stub.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids,
                                                     stub)
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    positions, deltas = Qwen2_5_VLModel.get_rope_index(
        stub, torch.tensor(input_ids, dtype=torch.long), torch.tensor(mm_token_type_ids),
        torch.tensor(image_grid_thw, dtype=torch.long), attention_mask=mask,
    )
    return positions.numpy(), deltas.numpy().reshape(-1)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("height,width,min_pixels,max_pixels", [
    (40, 30, MIN_PIXELS, MAX_PIXELS), (300, 200, MIN_PIXELS, MAX_PIXELS),
    (13, 1000, MIN_PIXELS, MAX_PIXELS), (900, 5, MIN_PIXELS, MAX_PIXELS),
    (1, 1, 56 * 56, 28 * 28 * 1280), (480, 640, 56 * 56, 28 * 28 * 1280),
    (3000, 4000, 4 * 28 * 28, 640 * 28 * 28), (20, 3000, MIN_PIXELS, MAX_PIXELS),
    (10, 2000, 56 * 56, 28 * 28 * 1280),  # aspect ratio exactly 200 is allowed
])
def test_smart_resize_matches_hf(height, width, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    assert smart_resize(height, width, 28, min_pixels, max_pixels) == hf_smart_resize(
        height, width, 28, min_pixels, max_pixels)


def test_smart_resize_rejects_extreme_aspect_ratio_and_empty_images():
    with pytest.raises(InputError, match=r"record 7 image 0 is 2010x10 pixels, aspect ratio 201"):
        smart_resize(10, 2010, name="record 7 image 0")
    with pytest.raises(InputError, match="empty"):
        smart_resize(0, 10)


@pytest.mark.parametrize("width,height,mode,seed", [
    (30, 40, "RGB", 0), (200, 300, "RGBA", 1), (1000, 13, "L", 2), (57, 57, "P", 3),
    (5, 900, "LA", 4), (28, 28, "RGB", 5), (640, 480, "RGB", 6),
])
def test_patches_bit_exact(hf_processor, width, height, mode, seed):
    image = testing.draw_image(width, height, seed, mode)
    expected = hf_processor.image_processor(images=[image], return_tensors="np")
    patches, grid_thw = preprocess_image(image, MIN_PIXELS, MAX_PIXELS)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"][0])
    assert patches.dtype == np.float32 and patches.shape == expected["pixel_values"].shape
    np.testing.assert_array_equal(patches, expected["pixel_values"])


def test_patches_bit_exact_with_hf_default_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image = Image.new("P", (150, 90))
    image.putpalette(list(range(256)) * 3)
    image.paste(testing.draw_image(150, 90, 7).convert("P"))
    image.info["transparency"] = 0  # palette transparency composites onto white, as RGBA does
    expected = Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")
    patches, grid_thw = preprocess_image(image)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"][0])
    np.testing.assert_array_equal(patches, expected["pixel_values"])


def test_load_image(tmp_path):
    image = testing.draw_image(40, 30, 0, "RGBA")
    image.save(tmp_path / "a.png")
    loaded = load_image(f"file://{tmp_path / 'a.png'}")
    assert loaded.mode == "RGBA" and loaded.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    testing.draw_image(40, 30, 1).save(buffer, "JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (30, 40)

    with pytest.raises(InputError, match=r"missing\.png.*not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"bad\.jpg.*cannot be decoded"):
        load_image(tmp_path / "bad.jpg")


# ----------------------------------------------------------------------------- prompts


def _messages(images, question, system=None):
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": question})
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": content}]


@pytest.mark.parametrize("sizes,system", [
    ([(60, 40)], None), ([(60, 40), (33, 300)], "Think in <think></think>."), ([], "S"),
    ([(500, 400)], None),
])
def test_encode_matches_hf_processor(processor, hf_processor, sizes, system):
    images = [testing.draw_image(w, h, i, "RGBA" if i else "RGB") for i, (w, h) in
              enumerate(sizes)]
    question = "What is the area? 3x + 5 = 20, \\boxed{5}"
    messages = _messages(images, question, system)
    text = hf_processor.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
    expected = hf_processor(images=images or None, text=[text], return_tensors="np")
    encoded = processor.encode(messages, name="record 3")
    assert encoded.text == text
    np.testing.assert_array_equal(encoded.input_ids, expected["input_ids"][0])
    assert encoded.input_ids.dtype == np.int32
    np.testing.assert_array_equal(
        expected["mm_token_type_ids"][0], encoded.input_ids == processor.image_token_id)
    if images:
        np.testing.assert_array_equal(encoded.image_grid_thw, expected["image_grid_thw"])
        np.testing.assert_array_equal(np.concatenate(encoded.patches), expected["pixel_values"])
    # The question/images/system form builds the same messages (images before the text).
    again = processor.encode(question=question, images=images, system=system)
    np.testing.assert_array_equal(again.input_ids, encoded.input_ids)


def test_default_system_prompt_and_generation_prompt(processor):
    text = processor.render(processor.build_messages("hi", num_images=1))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert processor.stop_token_ids == (processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def test_encode_errors_name_the_record(processor, tmp_path):
    image = testing.draw_image(60, 40, 0)
    with pytest.raises(InputError, match=r"rec-9: the rendered prompt has 2 <\|image_pad\|>"):
        processor.encode(question="look: <|image_pad|>", images=[image], name="rec-9")
    with pytest.raises(InputError, match=r"rec-9: prompt has \d+ tokens .* maximum prompt length"):
        processor.encode(question="x", images=[image], max_length=10, name="rec-9")
    with pytest.raises(InputError, match=r"rec-9 image 0 .*missing\.png.*not found"):
        processor.encode(question="x", images=[str(tmp_path / "missing.png")], name="rec-9")
    with pytest.raises(InputError, match="video"):
        processor.encode([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])
    with pytest.raises(InputError, match=r"rec-9 image 0: image content item has no image"):
        processor.encode(processor.build_messages("x", num_images=1), name="rec-9")


def test_image_settings_from_preprocessor_config(tmp_path, tok_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    config = {"size": {"shortest_edge": 3136, "longest_edge": 12845056}, "min_pixels": 6272}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    settings = QwenVLProcessor.from_pretrained(tmp_path).image
    assert (settings.min_pixels, settings.max_pixels) == (6272, 12845056)
    hf_size = Qwen2VLImageProcessorPil.from_pretrained(tmp_path).size
    assert (hf_size["shortest_edge"], hf_size["longest_edge"]) == (6272, 12845056)
    settings = QwenVLProcessor.from_pretrained(tmp_path, max_pixels=640 * 28 * 28).image
    assert (settings.min_pixels, settings.max_pixels) == (6272, 640 * 28 * 28)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    with pytest.raises(InputError, match="resample"):
        QwenVLProcessor.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- M-RoPE


def _padded(prompts, length, pad_id, side="left"):
    ids = np.full((len(prompts), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for b, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        columns = slice(length - n, length) if side == "left" else slice(0, n)
        ids[b, columns] = prompt.input_ids
        mask[b, columns] = 1
    return ids, mask


def test_mrope_positions_match_hf(processor):
    prompts = [
        processor.encode(question="two images", images=[testing.draw_image(60, 40, 0),
                                                        testing.draw_image(200, 300, 1)]),
        processor.encode(question="text only, no image at all"),
        processor.encode(question="tall", images=[testing.draw_image(13, 1000, 2)], system="S"),
    ]
    grids = np.concatenate([p.image_grid_thw for p in prompts])
    length = max(len(p.input_ids) for p in prompts) + 5
    for side in ("left", "right"):
        ids, mask = _padded(prompts, length, processor.pad_token_id, side)
        mm_token_type_ids = (ids == processor.image_token_id).astype(np.int64)
        expected, expected_deltas = hf_rope_index(ids, mm_token_type_ids, grids, mask)
        positions, deltas = mrope_positions(ids, mask, grids, processor.image_token_id, 2)
        assert positions.dtype == np.int32 and positions.shape == (3, *ids.shape)
        np.testing.assert_array_equal(positions, expected)
        np.testing.assert_array_equal(deltas, expected_deltas)
        assert (positions[:, mask == 0] == 0).all()  # HF leaves padding positions at 0
    # Without a mask every token counts, as in HF.
    ids = prompts[0].input_ids[None].astype(np.int64)
    expected, expected_deltas = hf_rope_index(ids, (ids == processor.image_token_id).astype(
        np.int64), prompts[0].image_grid_thw, None)
    positions, deltas = mrope_positions(ids, None, prompts[0].image_grid_thw,
                                        processor.image_token_id)
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_array_equal(deltas, expected_deltas)


def test_mrope_positions_errors(processor):
    prompt = processor.encode(question="q", images=[testing.draw_image(60, 40, 0)])
    ids = prompt.input_ids[None]
    with pytest.raises(InputError, match="more runs of image tokens than the 0 images"):
        mrope_positions(ids, None, np.zeros((0, 3)), processor.image_token_id)
    with pytest.raises(InputError, match=r"has 6 image tokens but its grid 1x8x8 needs 16"):
        mrope_positions(ids, None, [[1, 8, 8]], processor.image_token_id)
    with pytest.raises(InputError, match="2 image grids but 1 runs"):
        mrope_positions(ids, None, [[1, 4, 6], [1, 4, 6]], processor.image_token_id)


# ----------------------------------------------------------------------------- vision layout


def _grid(width, height):
    h, w = smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS)
    return [1, h // 14, w // 14]


@pytest.mark.parametrize("grids,window_size", [
    ([[1, 8, 8]], 112),  # exactly one 4x4-unit window
    ([[1, 16, 24]], 112),  # a multiple of the window
    ([_grid(30, 40)], 112),
    ([_grid(30, 40), _grid(200, 300), _grid(1000, 13)], 112),
    ([_grid(200, 300), [1, 4, 4], _grid(5, 900)], 56),
    ([[1, 18, 12], [1, 10, 30]], 56),
    ([[2, 6, 10]], 56),  # t > 1: one full-attention segment per frame
])
def test_vision_layout_matches_transformers(grids, window_size):
    import torch
    from transformers.vision_utils import (
        get_vision_attention_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    grid_thw = torch.tensor(grids)
    window_index, cu_window_seqlens = get_vision_window_index(grid_thw, 2, window_size, 14)
    position_ids = get_vision_position_ids(grid_thw, 2).numpy()
    config = testing.tiny_hf_config().vision_config
    cu_seqlens, _ = get_vision_attention_seqlens(grid_thw, config)
    n = int(grid_thw.prod(-1).sum())
    budget = n + 12
    layout = vision_layout(grids, budget, window_size, 14, 2)

    order = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1).numpy()
    slots = np.arange(n)
    np.testing.assert_array_equal(layout.order_P[:n], order)
    np.testing.assert_array_equal(layout.pos_hw_Px2[:n], position_ids[order])
    np.testing.assert_array_equal(
        layout.window_segment_P[:n],
        np.searchsorted(cu_window_seqlens.numpy(), slots, side="right") - 1)
    np.testing.assert_array_equal(
        layout.image_segment_P[:n], np.searchsorted(cu_seqlens.numpy(), slots, side="right") - 1)
    np.testing.assert_array_equal(layout.merged_row_of_unit_M[: n // 4],
                                  torch.argsort(window_index).numpy())
    assert layout.num_patches == n and layout.num_merged == n // 4
    assert (layout.order_P[n:] == 0).all() and (layout.pos_hw_Px2[n:] == 0).all()
    assert (layout.window_segment_P[n:] == -1).all() and (layout.image_segment_P[n:] == -1).all()
    assert (layout.merged_row_of_unit_M[n // 4:] == -1).all()
    for array in (layout.order_P, layout.pos_hw_Px2, layout.window_segment_P,
                  layout.image_segment_P, layout.merged_row_of_unit_M):
        assert array.dtype == np.int32


def test_token_sources_and_patches_follow_hf_unpermute(processor):
    prompts = [processor.encode(question="a", images=[testing.draw_image(60, 40, 0)]),
               processor.encode(question="b", images=[testing.draw_image(200, 300, 1),
                                                      testing.draw_image(90, 90, 2)])]
    grids = np.concatenate([p.image_grid_thw for p in prompts])
    layout = vision_layout(grids, 512, 56, 14, 2)
    ids, _ = _padded(prompts, 200, processor.pad_token_id)
    sources = image_token_sources(ids, processor.image_token_id, layout)
    is_image = ids == processor.image_token_id
    assert (sources[~is_image] == -1).all()
    # Merged row m (window order) holds HF merged unit window_index[m]; HF's k-th image token
    # receives unit k after un-permuting, so the unit behind each token must count 0, 1, 2, ...
    window_index = np.argsort(layout.merged_row_of_unit_M[: layout.num_merged])
    np.testing.assert_array_equal(window_index[sources[is_image]], np.arange(layout.num_merged))

    patches = gather_patches([p for prompt in prompts for p in prompt.patches], layout)
    all_patches = np.concatenate([p for prompt in prompts for p in prompt.patches])
    assert patches.shape == (512, 1176) and patches.dtype == np.float32
    np.testing.assert_array_equal(patches[: layout.num_patches], all_patches[layout.order_P[
        : layout.num_patches]])
    assert not patches[layout.num_patches:].any()

    with pytest.raises(InputError, match="the batch: image features and image tokens do not"):
        image_token_sources(ids[:1], processor.image_token_id, layout)


def test_layout_budget_and_buckets():
    with pytest.raises(InputError, match=r"batch 3 needs 400 patches but the budget is 256: "
                                         r"raise data.max_patches or lower max_pixels"):
        vision_layout([[1, 20, 20]], 256, 112, 14, 2, source="batch 3")
    with pytest.raises(InputError, match="multiple of"):
        vision_layout([[1, 2, 2]], 10, 112, 14, 2)
    empty = vision_layout([], 8, 112, 14, 2)
    assert empty.num_patches == 0 and (empty.image_segment_P == -1).all()
    assert next_bucket(5, [4, 8, 16]) == 8 and next_bucket(8, [16, 8]) == 8
    with pytest.raises(InputError, match="prompt length 17 exceeds the largest bucket 16"):
        next_bucket(17, [4, 16], what="prompt length")


# ----------------------------------------------------------------------------- fixtures + HF


def test_tokenizer_fixture_is_deterministic_and_loads(tmp_path, tok_dir):
    ids = testing.make_tokenizer_dir(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()
    assert 500 <= ids["vocab_size"] <= 1000
    named = [v for k, v in ids.items() if k != "vocab_size"]
    assert len(set(named)) == len(named) == 20


def test_tiny_model_runs_on_processor_output(tmp_path, processor):
    """Smoke test: the tiny HF model runs on our prompts (with mm_token_type_ids, without which
    transformers 5.x silently uses 1-D positions) and computes our positions and rope deltas."""
    import torch
    from safetensors.numpy import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    model_dir = testing.make_hf_model_dir(tmp_path / "model")
    weights = load_file(model_dir / "model.safetensors")
    assert "lm_head.weight" in weights
    assert not np.allclose(weights["model.norm.weight"], 1.0)
    assert not np.allclose(weights["visual.blocks.0.attn.qkv.bias"], 0.0)

    prompts = [processor.encode(question="3x + 5 = 20", images=[testing.draw_image(60, 40, 0)]),
               processor.encode(question="area?", images=[testing.draw_image(100, 130, 1),
                                                          testing.draw_image(30, 30, 2)])]
    ids, mask = _padded(prompts, 96, processor.pad_token_id)
    grids = np.concatenate([p.image_grid_thw for p in prompts])
    positions, deltas = mrope_positions(ids, mask, grids, processor.image_token_id)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    input_ids = torch.tensor(ids)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(np.concatenate([p for q in prompts for p in q.patches])),
            image_grid_thw=torch.tensor(grids, dtype=torch.long),
            mm_token_type_ids=(input_ids == processor.image_token_id).long(),
        ).logits
    real = logits[torch.tensor(mask, dtype=torch.bool)]
    assert torch.isfinite(real).all() and real.std() > 0.1
    np.testing.assert_array_equal(model.model.rope_deltas.numpy().reshape(-1), deltas)
    assert positions.max() < ids.shape[1]
