"""InternVL2.5 release checkpoints -> transformers' native InternVL layout.

A tiny random native model is written here in the ORIGINAL release layout (InternViT's fused qkv,
InternLM2's fused wqkv, a locally trained sentencepiece tokenizer.model); the converted directory
must load with InternVLForConditionalGeneration.from_pretrained and give the same logits on an
input with an image. The inverse mapping below is written from InternLM2's modeling code, not from
the converter: wqkv's rows are, for each kv head j in turn, its G query heads (heads j*G ..
j*G+G-1), then key head j, then value head j.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration

from eureka_jax.cli import main as cli_main
from eureka_jax.errors import InputError
from eureka_jax.models.internvl_convert import convert_release_checkpoint

INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                   "<box>", "</box>"]
CHAT_TOKENS = ["<|im_end|>", "<|im_start|>"]  # user-defined pieces of the sentencepiece model
IMAGE, PATCH = 56, 14  # 4x4 patches per tile -> 2x2 = 4 image tokens after the pixel shuffle
CORPUS = [
    "What is the area of the triangle with base 3 and height 4?",
    "The answer is 6. Let me think step by step about the shapes in the image.",
    "A circle of radius r has area pi r squared; a square of side s has area s squared.",
    "Solve for x: 2x + 3 = 11, so x = 4. Check: 2 * 4 + 3 = 11.",
    "user assistant system image picture figure number count red blue green",
] * 20


# ---------------------------------------------------------------------------------------------
# Fixtures: a sentencepiece tokenizer, a tiny native model, its release-layout directory
# ---------------------------------------------------------------------------------------------


# sentencepiece normalizer settings: identity without whitespace clean-up, without and with the
# dummy prefix; sentencepiece's defaults (NFKC charsmap, clean-up, prefix); identity + clean-up.
SP_SETTINGS = {
    "no_dummy_prefix": dict(add_dummy_prefix=False),
    "dummy_prefix": dict(add_dummy_prefix=True),
    "nfkc_cleanup": dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True),
    "identity_cleanup": dict(remove_extra_whitespaces=True),
}


def _train_sentencepiece(**settings) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0,
        **({"normalization_rule_name": "identity", "remove_extra_whitespaces": False,
            "add_dummy_prefix": True} | settings),
        user_defined_symbols=CHAT_TOKENS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module", params=SP_SETTINGS)
def sp_model(request) -> bytes:
    return _train_sentencepiece(**SP_SETTINGS[request.param])


def _tokenizer_config(sp_size: int, image_tokens: list[str] = INTERNVL_TOKENS) -> dict:
    """InternLM2-style tokenizer_config.json: <unk> <s> </s> and the chat tokens are pieces of the
    sentencepiece model, the InternVL tokens follow the pieces."""
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, "<|im_start|>": 4}
    ids |= {t: sp_size + i for i, t in enumerate(image_tokens)}
    added = {str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True} for t, i in ids.items()}
    return {"tokenizer_class": "InternLM2Tokenizer", "add_bos_token": True,
            "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
            "unk_token": "<unk>", "model_max_length": 4096, "added_tokens_decoder": added,
            "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}


def _native_model(text: str, vocab_size: int, image_token_id: int, select_layer: int = -1,
                  vision: dict | None = None, llm: dict | None = None, tie: bool = False,
                  ) -> InternVLForConditionalGeneration:
    """A tiny random native model whose release has the language model `text` ("internlm2",
    "llama" or "qwen2"); `vision` / `llm` override its vision / text config."""
    torch.manual_seed(0)
    text_config = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=tie,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if text in ("internlm2", "llama"):  # InternLM2 converts to a Llama text model
        text_config.update(model_type="llama", head_dim=8, attention_bias=False)
    else:
        text_config.update(model_type="qwen2")
    text_config |= llm or {}
    vision_config = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
                         attention_bias=True, norm_type="layer_norm", layer_norm_eps=1e-6)
    vision_config |= vision or {}
    config = InternVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        image_seq_length=(IMAGE // PATCH) ** 2 // 4, downsample_ratio=0.5,
        vision_feature_layer=select_layer, tie_word_embeddings=tie)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # every parameter random, so a swapped name shows in the logits
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def _interleave_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                     num_kv_heads: int) -> torch.Tensor:
    """InternLM2's wqkv rows (or bias) from q_proj's, k_proj's and v_proj's."""
    head_dim = q.shape[0] // num_heads
    groups = num_heads // num_kv_heads
    rows = []
    for j in range(num_kv_heads):
        for g in range(groups):
            head = j * groups + g
            rows.append(q[head * head_dim:(head + 1) * head_dim])
        rows.append(k[j * head_dim:(j + 1) * head_dim])
        rows.append(v[j * head_dim:(j + 1) * head_dim])
    return torch.cat(rows)


def release_state_dict(model: InternVLForConditionalGeneration, text: str,
                       tied_head_copy: bool = False) -> dict:
    """The native model's weights under the release checkpoint's names."""
    native = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config.text_config
    out = {}

    def move(src: str, dst: str) -> None:
        if src in native:  # optional tensors (biases, qk norms) move when the model has them
            out[dst] = native.pop(src)

    vt = "model.vision_tower."
    move(vt + "embeddings.cls_token", "vision_model.embeddings.class_embedding")
    move(vt + "embeddings.position_embeddings", "vision_model.embeddings.position_embedding")
    for p in ("weight", "bias"):
        move(f"{vt}embeddings.patch_embeddings.projection.{p}",
             f"vision_model.embeddings.patch_embedding.{p}")
    for i in range(model.config.vision_config.num_hidden_layers):
        src, dst = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        move(src + "lambda_1", dst + "ls1")
        move(src + "lambda_2", dst + "ls2")
        for p in ("weight", "bias"):
            if src + f"attention.q_proj.{p}" in native:
                out[dst + f"attn.qkv.{p}"] = torch.cat(
                    [native.pop(src + f"attention.{x}_proj.{p}") for x in "qkv"])
            move(src + f"attention.projection_layer.{p}", dst + f"attn.proj.{p}")
            move(src + f"layernorm_before.{p}", dst + f"norm1.{p}")
            move(src + f"layernorm_after.{p}", dst + f"norm2.{p}")
            for fc in ("fc1", "fc2"):
                move(src + f"mlp.{fc}.{p}", dst + f"mlp.{fc}.{p}")
        move(src + "attention.q_norm.weight", dst + "attn.q_norm.weight")
        move(src + "attention.k_norm.weight", dst + "attn.k_norm.weight")
    for index, name in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")):
        for p in ("weight", "bias"):
            move(f"model.multi_modal_projector.{name}.{p}", f"mlp1.{index}.{p}")
    lm = "model.language_model."
    head = native.pop("lm_head.weight")
    if text != "internlm2":  # Qwen2 and Llama language models keep transformers' names
        for name in list(native):
            move(name, "language_model.model." + name[len(lm):])
        if not cfg.tie_word_embeddings or tied_head_copy:
            out["language_model.lm_head.weight"] = head
        assert not native, native.keys()
        return out
    move(lm + "embed_tokens.weight", "language_model.model.tok_embeddings.weight")
    move(lm + "norm.weight", "language_model.model.norm.weight")
    if not cfg.tie_word_embeddings or tied_head_copy:
        out["language_model.output.weight"] = head
    for i in range(cfg.num_hidden_layers):
        src, dst = f"{lm}layers.{i}.", f"language_model.model.layers.{i}."
        for p in ("weight", "bias"):
            if src + f"self_attn.q_proj.{p}" in native:
                out[dst + f"attention.wqkv.{p}"] = _interleave_wqkv(
                    *(native.pop(src + f"self_attn.{x}_proj.{p}") for x in "qkv"),
                    cfg.num_attention_heads, cfg.num_key_value_heads)
            move(src + f"self_attn.o_proj.{p}", dst + f"attention.wo.{p}")
        move(src + "mlp.gate_proj.weight", dst + "feed_forward.w1.weight")
        move(src + "mlp.up_proj.weight", dst + "feed_forward.w3.weight")
        move(src + "mlp.down_proj.weight", dst + "feed_forward.w2.weight")
        move(src + "input_layernorm.weight", dst + "attention_norm.weight")
        move(src + "post_attention_layernorm.weight", dst + "ffn_norm.weight")
    assert not native, native.keys()
    return out


def release_config(model: InternVLForConditionalGeneration, text: str) -> dict:
    t, v = model.config.text_config, model.config.vision_config
    rope = t.rope_parameters
    scaling = (None if rope["rope_type"] == "default"
               else {"type": rope["rope_type"], "factor": rope["factor"]})
    common = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                  num_attention_heads=t.num_attention_heads,
                  num_key_value_heads=t.num_key_value_heads, num_hidden_layers=t.num_hidden_layers,
                  vocab_size=t.vocab_size, rms_norm_eps=t.rms_norm_eps, hidden_act="silu",
                  max_position_embeddings=t.max_position_embeddings,
                  rope_theta=rope["rope_theta"], rope_scaling=scaling,
                  tie_word_embeddings=t.tie_word_embeddings, bos_token_id=1, eos_token_id=2,
                  torch_dtype="float32")
    if text == "internlm2":
        llm = dict(common, architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                   bias=t.attention_bias, pad_token_id=2, attn_implementation="eager",
                   auto_map={"AutoModel": "modeling_internlm2.InternLM2ForCausalLM"})
    elif text == "llama":
        llm = dict(common, architectures=["LlamaForCausalLM"], model_type="llama",
                   attention_bias=t.attention_bias, mlp_bias=t.mlp_bias, head_dim=t.head_dim)
    else:
        llm = dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                   use_sliding_window=False, sliding_window=None,
                   max_window_layers=t.num_hidden_layers)
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b",
                  hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_attention_heads=v.num_attention_heads, num_hidden_layers=v.num_hidden_layers,
                  image_size=IMAGE, patch_size=PATCH, num_channels=3, qkv_bias=v.attention_bias,
                  qk_normalization=v.use_qk_norm, norm_type=v.norm_type, layer_norm_eps=1e-6,
                  hidden_act="gelu", dropout=0.0, attention_dropout=0.0, drop_path_rate=0.0,
                  use_flash_attn=False)
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
            "llm_config": llm, "vision_config": vision, "downsample_ratio": 0.5,
            "select_layer": model.config.vision_feature_layer, "template": "internvl2_5",
            "ps_version": "v2", "force_image_size": IMAGE, "dynamic_image_size": True,
            "use_thumbnail": True, "max_dynamic_patch": 6, "min_dynamic_patch": 1}


def write_release(directory: Path, model, text: str, sp_bytes: bytes | None, shards: int = 1,
                  tokenizer_config: dict | None = None, tied_head_copy: bool = False,
                  dtype: torch.dtype = torch.float32) -> Path:
    """A release directory (weights stored as `dtype`); `sp_bytes` None: no tokenizer (the
    caller writes one)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(release_config(model, text)))
    if sp_bytes is not None:
        (directory / "tokenizer.model").write_bytes(sp_bytes)
        sp_size = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()
        (directory / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config or _tokenizer_config(sp_size)))
    tensors = {name: value.to(dtype) for name, value
               in release_state_dict(model, text, tied_head_copy=tied_head_copy).items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for s, part in enumerate(np.array_split(np.array(names), shards), start=1):
        filename = f"model-{s:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(directory / filename),
                  metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part.tolist(), filename)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _image_input(sp_size: int, num_tiles: int, tokens_per_tile: int) -> dict:
    img, ctx, end = sp_size, sp_size + 2, sp_size + 1
    ids = [1, 40, 41, 42, img] + [ctx] * (tokens_per_tile * num_tiles) + [end, 50, 51, 3, 7]
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(num_tiles, 3, IMAGE, IMAGE, generator=generator)}


@pytest.fixture(scope="module")
def small_sp() -> bytes:
    return _train_sentencepiece(add_dummy_prefix=False)


# ---------------------------------------------------------------------------------------------
# Logit parity
# ---------------------------------------------------------------------------------------------


PARITY_CASES = {
    # InternVL2.5-8B-like: InternLM2 with GQA, InternViT-300M-like vision, three shards
    "internlm2": dict(text="internlm2", shards=3),
    # InternLM2 with its `bias` flag and dynamic NTK rope that the 19-token input triggers
    "internlm2_bias_dynamic_rope": dict(text="internlm2", llm=dict(
        attention_bias=True, max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    # InternVL2.5-1B-like: Qwen2, features from the second-to-last vision layer
    "qwen2": dict(text="qwen2", select_layer=-2),
    # InternViT-6B-like vision (26B and up): RMSNorm, q/k norms, no qkv bias
    "qwen2_internvit_6b": dict(text="qwen2", vision=dict(norm_type="rms_norm", use_qk_norm=True,
                                                         attention_bias=False)),
    # tied embeddings, with and without a copy of the head in the checkpoint
    "qwen2_tied": dict(text="qwen2", tie=True),
    "qwen2_tied_head_copy": dict(text="qwen2", tie=True, tied_head_copy=True),
    # a Llama language model in transformers' names, with biases
    "llama": dict(text="llama", llm=dict(attention_bias=True, mlp_bias=True)),
    # the releases' dtype: bfloat16 files (the weights are bfloat16 values; the logits compare in
    # float32, where casting the rotary buffers to bfloat16 cannot blur them)
    "internlm2_bfloat16": dict(text="internlm2", shards=2, file_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_converted_checkpoint_gives_the_original_logits(tmp_path, small_sp, case):
    options = dict(PARITY_CASES[case])
    text, shards = options.pop("text"), options.pop("shards", 1)
    tied_head_copy = options.pop("tied_head_copy", False)
    file_dtype = options.pop("file_dtype", torch.float32)
    sp_size = spm.SentencePieceProcessor(model_proto=small_sp).get_piece_size()
    model = _native_model(text, vocab_size=sp_size + len(INTERNVL_TOKENS) + 3,
                          image_token_id=sp_size + 2, **options)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(file_dtype))
    src = write_release(tmp_path / "release", model, text, small_sp, shards=shards,
                        tied_head_copy=tied_head_copy, dtype=file_dtype)
    report = convert_release_checkpoint(src, tmp_path / "native")
    assert report.image_token_id == sp_size + 2
    assert report.num_shards == shards
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "native")
    assert tokenizer.video_token_id == sp_size + 9  # a spare embedding row takes <video>
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == "internvl"
    assert config["text_config"]["model_type"] == model.config.text_config.model_type
    assert config["vision_feature_layer"] == model.config.vision_feature_layer
    assert config["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert config["dtype"] == str(file_dtype).removeprefix("torch.")

    converted, info = InternVLForConditionalGeneration.from_pretrained(
        tmp_path / "native", output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want_params, got_params = model.state_dict(), converted.state_dict()
    assert sorted(got_params) == sorted(want_params)
    for name, value in want_params.items():
        assert torch.equal(got_params[name], value), name
    inputs = _image_input(sp_size, num_tiles=2, tokens_per_tile=config["image_seq_length"])
    with torch.no_grad():
        want = model(**inputs).logits
        got = converted.eval()(**inputs).logits
    assert want.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6)


def test_wqkv_split_is_not_a_plain_thirds_split(tmp_path, small_sp):
    """With GQA the interleaved layout matters: a checkpoint whose wqkv is [q; k; v] instead gives
    different logits, so the parity test above does see the layout."""
    sp_size = spm.SentencePieceProcessor(model_proto=small_sp).get_piece_size()
    model = _native_model("internlm2", vocab_size=sp_size + 12, image_token_id=sp_size + 2,
                          select_layer=-1)
    src = write_release(tmp_path / "release", model, "internlm2", small_sp)
    tensors = release_state_dict(model, "internlm2")
    native = model.state_dict()
    for i in range(2):
        tensors[f"language_model.model.layers.{i}.attention.wqkv.weight"] = torch.cat(
            [native[f"model.language_model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv"])
    save_file(tensors, str(src / "model.safetensors"))
    convert_release_checkpoint(src, tmp_path / "native")
    converted = InternVLForConditionalGeneration.from_pretrained(tmp_path / "native").eval()
    inputs = _image_input(sp_size, num_tiles=1, tokens_per_tile=4)
    with torch.no_grad():
        diff = (converted(**inputs).logits - model(**inputs).logits).abs().max().item()
    assert diff > 1e-2


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _reference_ids(sp: spm.SentencePieceProcessor, added: dict[str, int], text: str) -> list[int]:
    """InternLM2Tokenizer: split at added tokens, sp.encode each piece, <s> first."""
    ids = [sp.bos_id()]
    pattern = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
    position = 0
    for match in re.finditer(pattern, text):
        if match.start() > position:
            ids += sp.encode(text[position:match.start()])
        ids.append(added[match.group()])
        position = match.end()
    if position < len(text):
        ids += sp.encode(text[position:])
    return ids


TEXTS = [
    "What is the area of the triangle?",
    " leading space and  two spaces, trailing ",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nSolve 2x + 3 = 11.",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "unseen: 数学 ü ☃ qzxj",
    "<s>x</s><ref>box</ref><box>[[1, 2]]</box>",
    "",
]


def test_sentencepiece_tokenizer_matches_the_original(tmp_path, sp_model):
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    sp_size = sp.get_piece_size()
    model = _native_model("internlm2", vocab_size=sp_size + 9, image_token_id=sp_size + 2,
                          select_layer=-1)
    src = write_release(tmp_path / "release", model, "internlm2", sp_model)
    convert_release_checkpoint(src, tmp_path / "native")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "native")
    added = {t: sp_size + i for i, t in enumerate(INTERNVL_TOKENS)}
    added |= {t: sp.piece_to_id(t) for t in ["<unk>", "<s>", "</s>", *CHAT_TOKENS]}
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == _reference_ids(sp, added, text), text
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == sp_size + 2
    assert tokenizer.context_image_token == "<IMG_CONTEXT>"
    assert tokenizer.start_image_token_id == sp_size
    assert len(tokenizer) == sp_size + 9  # no embedding row to spare: no <video> added
    assert tokenizer.decode(tokenizer("Solve 2x + 3 = 11.")["input_ids"],
                            skip_special_tokens=True) == "Solve 2x + 3 = 11."


def test_project_processor_feeds_the_converted_model(tmp_path, small_sp):
    """processing/internvl.py reads the converted directory (tiles, chat template, image tokens)
    and its prompt gives the original model's logits."""
    from PIL import Image

    from eureka_jax.processing.internvl import InternVLPromptProcessor

    sp_size = spm.SentencePieceProcessor(model_proto=small_sp).get_piece_size()
    model = _native_model("internlm2", vocab_size=sp_size + 9, image_token_id=sp_size + 2,
                          select_layer=-1)
    src = write_release(tmp_path / "release", model, "internlm2", small_sp)
    convert_release_checkpoint(src, tmp_path / "native")
    processor = InternVLPromptProcessor.from_pretrained(tmp_path / "native")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 120, 3), np.uint8))
    prompt = processor.encode(question="What is shown?", images=[image])
    assert prompt.text == ("<|im_start|>user\n<IMG_CONTEXT>\nWhat is shown?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert prompt.tiles_per_image == (3,)  # a 2:1 image: two 56-px tiles and the thumbnail
    ids = prompt.input_ids.tolist()
    assert ids.count(sp_size + 2) == 4 * 3
    assert ids[0] == 1  # <s>
    assert ids[ids.index(sp_size) + 1] == sp_size + 2  # <img><IMG_CONTEXT>...
    im_end = spm.SentencePieceProcessor(model_proto=small_sp).piece_to_id("<|im_end|>")
    assert processor.stop_token_ids == (2, im_end)  # generation_config.json: </s>, <|im_end|>
    converted = InternVLForConditionalGeneration.from_pretrained(tmp_path / "native").eval()
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": torch.from_numpy(prompt.tiles)}
    with torch.no_grad():
        want = model(**inputs).logits
        got = converted(**inputs).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6)


def _write_qwen2_tokenizer(directory: Path) -> int:
    """A Qwen2-style tokenizer (vocab.json + merges.txt, added tokens in tokenizer_config.json)
    trained here. Returns the id of <IMG_CONTEXT>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.model.save(str(directory))
    size = bpe.get_vocab_size()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]
    added = {str(size + i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                             "single_word": False, "special": True} for i, t in enumerate(specials)}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 8192}))
    return size + 5


def test_qwen2_tokenizer_is_carried_over(tmp_path):
    from transformers import Qwen2Tokenizer

    src = tmp_path / "release"
    src.mkdir()
    context_id = _write_qwen2_tokenizer(src)
    model = _native_model("qwen2", vocab_size=context_id + 8, image_token_id=context_id)
    write_release(src, model, "qwen2", sp_bytes=None)
    report = convert_release_checkpoint(src, tmp_path / "native")
    assert report.image_token_id == context_id
    original = Qwen2Tokenizer.from_pretrained(src)
    converted = AutoTokenizer.from_pretrained(tmp_path / "native")
    for text in TEXTS:
        assert converted(text)["input_ids"] == original(text)["input_ids"], text
    assert converted.eos_token == "<|im_end|>" and converted.bos_token is None
    generation = json.loads((tmp_path / "native" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [context_id - 3]  # <|im_end|>


def test_tokenizer_matches_sentencepiece_on_random_text(tmp_path, sp_model):
    """Merge order, byte fallback and the normalizer over many strings, not only the handful
    above."""
    from eureka_jax.models.internvl_convert import build_sentencepiece_tokenizer

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    tokenizer = build_sentencepiece_tokenizer(tmp_path / "tokenizer.model", add_bos_token=False)
    alphabet = list("".join(CORPUS)) + [" ", "  ", "\n", "\t", "\u3000", "é", "数", "🙂", "ｆ",
                                        "①", "<", ">"]
    rng = np.random.default_rng(0)
    for _ in range(500):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 60))))
        text = text.replace("<|im_end|>", "").replace("<|im_start|>", "")
        assert tokenizer.encode(text).ids == sp.encode(text), repr(text)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def release_dir(tmp_path, small_sp) -> Path:
    sp_size = spm.SentencePieceProcessor(model_proto=small_sp).get_piece_size()
    model = _native_model("internlm2", vocab_size=sp_size + 9, image_token_id=sp_size + 2,
                          select_layer=-1)
    return write_release(tmp_path / "release", model, "internlm2", small_sp, shards=2)


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_unknown_llm_architecture(release_dir, tmp_path):
    _edit_config(release_dir, lambda c: c["llm_config"].update(architectures=["PhiForCausalLM"]))
    with pytest.raises(InputError, match=r"config\.json: field 'llm_config\.architectures'"):
        convert_release_checkpoint(release_dir, tmp_path / "out")


def test_already_native_checkpoint(release_dir, tmp_path):
    _edit_config(release_dir, lambda c: c.update(architectures=["InternVLForConditionalGeneration"],
                                                 model_type="internvl"))
    with pytest.raises(InputError, match="already the native layout"):
        convert_release_checkpoint(release_dir, tmp_path / "out")


def _rewrite_shard(directory: Path, edit) -> None:
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    filename = index["weight_map"]["language_model.model.layers.1.attention.wqkv.weight"]
    tensors = load_file(str(directory / filename))
    edit(tensors)
    save_file(tensors, str(directory / filename))


def test_missing_tensor(release_dir, tmp_path):
    name = "language_model.model.layers.1.attention.wqkv.weight"
    index_path = release_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match=rf"model\.safetensors\.index\.json: tensor '{name}' "
                                         "is missing"):
        convert_release_checkpoint(release_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_tensor_missing_from_its_shard(release_dir, tmp_path):
    name = "language_model.model.layers.1.attention.wqkv.weight"
    _rewrite_shard(release_dir, lambda t: t.pop(name))
    with pytest.raises(InputError, match=rf"puts tensor '{re.escape(name)}' in .*safetensors"):
        convert_release_checkpoint(release_dir, tmp_path / "out")


def test_shape_mismatch(release_dir, tmp_path):
    name = "language_model.model.layers.1.attention.wqkv.weight"
    _rewrite_shard(release_dir, lambda t: t.update({name: t[name][:-8].contiguous()}))
    with pytest.raises(InputError, match=rf"tensor '{re.escape(name)}' has shape \[56, 32\], "
                                         r"but config\.json implies \[64, 32\]"):
        convert_release_checkpoint(release_dir, tmp_path / "out")


def test_unexpected_tensor(release_dir, tmp_path):
    _rewrite_shard(release_dir, lambda t: t.update({"language_model.extra.weight": torch.ones(2)}))
    index_path = release_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["language_model.extra.weight"] = index["weight_map"][
        "language_model.model.layers.1.attention.wqkv.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="'language_model.extra.weight' is not part of"):
        convert_release_checkpoint(release_dir, tmp_path / "out")


def test_pickle_checkpoint_is_refused(release_dir, tmp_path):
    for file in release_dir.glob("model*"):
        file.unlink()
    (release_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InputError, match="pickle weights only .*convert them to safetensors"):
        convert_release_checkpoint(release_dir, tmp_path / "out")


def test_vocab_larger_than_the_embedding(release_dir, tmp_path):
    _edit_config(release_dir, lambda c: c["llm_config"].update(vocab_size=300))
    # the shapes are checked first: make the embeddings match the smaller vocab_size
    config = json.loads((release_dir / "config.json").read_text())
    index = json.loads((release_dir / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    for name in ("language_model.model.tok_embeddings.weight", "language_model.output.weight"):
        path = release_dir / index["weight_map"][name]
        tensors = load_file(str(path))
        tensors[name] = tensors[name][:config["llm_config"]["vocab_size"]].contiguous()
        save_file(tensors, str(path))
    with pytest.raises(InputError, match=r"tokenizer\.model: the tokenizer has 409 ids, more than "
                                         r"the checkpoint's 300 .*'llm_config\.vocab_size'"):
        convert_release_checkpoint(release_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_vocab_without_the_image_tokens(release_dir, tmp_path, small_sp):
    sp_size = spm.SentencePieceProcessor(model_proto=small_sp).get_piece_size()
    config = _tokenizer_config(sp_size, image_tokens=["<quad>", "</quad>"])
    (release_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"tokenizer\.model: the vocabulary \(vocab_size 402\) "
                                         r"lacks the image tokens \['<img>', '</img>', "
                                         r"'<IMG_CONTEXT>'\]"):
        convert_release_checkpoint(release_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_added_token_ids_must_follow_the_pieces(release_dir, tmp_path, small_sp):
    sp_size = spm.SentencePieceProcessor(model_proto=small_sp).get_piece_size()
    config = _tokenizer_config(sp_size)
    config["added_tokens_decoder"] = {str(int(k) + (int(k) >= sp_size)): v
                                      for k, v in config["added_tokens_decoder"].items()}
    (release_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="added token '<img>' has id 401, but the sentencepiece "
                                         "model gives it 400"):
        convert_release_checkpoint(release_dir, tmp_path / "out")


def test_tied_head_that_differs_from_the_embedding(tmp_path, small_sp):
    sp_size = spm.SentencePieceProcessor(model_proto=small_sp).get_piece_size()
    model = _native_model("qwen2", vocab_size=sp_size + 9, image_token_id=sp_size + 2, tie=True)
    src = write_release(tmp_path / "release", model, "qwen2", small_sp, tied_head_copy=True)
    from safetensors.torch import load_file

    tensors = load_file(str(src / "model.safetensors"))
    tensors["language_model.lm_head.weight"] = tensors["language_model.lm_head.weight"] + 1
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(InputError, match="'language_model.lm_head.weight' differs from "
                                         "'language_model.model.embed_tokens.weight'.*"
                                         "'llm_config.tie_word_embeddings' is true"):
        convert_release_checkpoint(src, tmp_path / "out")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(ps_version="v1"), "field 'ps_version' is 'v1'"),
    (lambda c: c.update(template="vicuna_v1.1"), "field 'template' is 'vicuna_v1.1'"),
    (lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}),
     "field 'llm_config.rope_scaling'"),
    (lambda c: c["vision_config"].pop("qkv_bias"), "vision_config has no field 'qkv_bias'"),
    (lambda c: c.update(force_image_size=448), "field 'force_image_size' \\(448\\) differs"),
], ids=["ps_version", "template", "rope", "qkv_bias", "image_size"])
def test_config_the_converter_cannot_honour(release_dir, tmp_path, edit, message):
    _edit_config(release_dir, edit)
    with pytest.raises(InputError, match=rf"config\.json: .*{message}"):
        convert_release_checkpoint(release_dir, tmp_path / "out")


def test_output_directory_with_a_checkpoint_is_refused(release_dir, tmp_path):
    convert_release_checkpoint(release_dir, tmp_path / "out")
    with pytest.raises(InputError, match="already holds a checkpoint"):
        convert_release_checkpoint(release_dir, tmp_path / "out")
    with pytest.raises(InputError, match="is the input directory"):
        convert_release_checkpoint(release_dir, release_dir)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_converts_and_reports(release_dir, tmp_path, capsys):
    assert cli_main(["convert-internvl", "--input", str(release_dir),
                     "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "InternLM2ForCausalLM" in out and str(tmp_path / "out") in out
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_cli_bad_input_exits_2_with_the_message(release_dir, tmp_path, capsys):
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    _edit_config(release_dir, lambda c: c["llm_config"].update(architectures=["PhiForCausalLM"]))
    assert cli_main(["convert-internvl", "--input", str(release_dir),
                     "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eureka-jax convert-internvl: ")
    assert "llm_config.architectures" in err
