"""Original InternVL2.5 release checkpoints -> transformers' native InternVL layout.

The release repositories (OpenGVLab/InternVL2_5-8B, ...) hold an `InternVLChatModel` that only
loads with trust_remote_code: an InternViT vision tower (`vision_model.*`, fused `attn.qkv`), a
pixel-shuffle MLP projector (`mlp1.*`) and a language model (`language_model.*`) that is InternLM2
(fused `attention.wqkv`, `feed_forward.w1/w2/w3`, `tok_embeddings`, `output`) or Qwen2 / Llama
(already in transformers' names). `convert_release_checkpoint` writes the layout of the "-hf"
repositories (`InternVLForConditionalGeneration`, model_type "internvl", an InternLM2 language model
becoming a Llama one), which transformers loads without remote code:

    eureka-jax convert-internvl --input InternVL2_5-8B --output InternVL2_5-8B-native

Everything is checked (config fields, tensor names and shapes from the shard headers, tokenizer
against the embedding) before the first file is written. The weights are then converted one input
shard at a time into one output shard each, read through a memory map (hf_io.SafetensorsFile):
renamed tensors are written straight from it and only the split q/k/v tensors are copied. Pickle
checkpoints (.bin/.pt) are refused: loading them runs arbitrary code.

InternLM2's `wqkv` [K*(G+2)*H, D] (K kv heads, G = N/K query heads per kv head, H head dim, D model
dim) stores, for each kv head in turn, its G query heads, then its key head, then its value head:
query head n belongs to kv head n // G, which is what transformers' GQA (`repeat_kv`) expects of
q_proj's rows, so splitting is a reshape to [K, G+2, H, D] and three slices.

The tokenizer: an InternLM2 sentencepiece `tokenizer.model` (+ the added tokens of
tokenizer_config.json) becomes a fast tokenizer.json that tokenizes like the original
(`build_sentencepiece_tokenizer`); a Qwen2 tokenizer (tokenizer.json or vocab.json + merges.txt)
is carried over. Either is checked against the checkpoint (`check_vocab`): every id fits the
embedding rows and <img>, </img>, <IMG_CONTEXT> exist. The chat template, the image processor
(GotOcr2, InternVL's dynamic 448-px tiling) and processor configs the native processor needs are
written beside it. The chat template is the -hf repositories' ChatML one: unlike the release's
`chat()`, it adds no default system message when the conversation has none.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from eureka_jax.errors import InputError
from eureka_jax.hf_io import SafetensorsFile, write_safetensors

# llm_config.architectures[0] -> (transformers model_type of the native text config, name family)
LLM_ARCHITECTURES = {
    "InternLM2ForCausalLM": ("llama", "internlm2"),
    "Qwen2ForCausalLM": ("qwen2", "hf"),
    "LlamaForCausalLM": ("llama", "hf"),
}
# The release templates that are ChatML (<|im_start|>role\n...<|im_end|>), as the native one is.
CHATML_TEMPLATES = ("internvl2_5", "internlm2-chat", "Hermes-2")
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The native processor's ChatML template: an image part becomes "<IMG_CONTEXT>\n", which
# transformers' InternVLProcessor (and processing/internvl.py) expands to
# <img><IMG_CONTEXT>*(tokens per tile * tiles)</img>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ConvertReport:
    """What `convert_release_checkpoint` wrote."""
    output_dir: Path
    llm_architecture: str
    num_tensors: int  # native tensors written
    num_shards: int
    image_token_id: int
    vocab_size: int  # tokenizer ids (sentencepiece pieces + added tokens)


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({e}); restore it from the release"
                         ) from e


def _field(config: dict, name: str, where: str, path: Path):
    if name not in config:
        raise InputError(f"{path}: {where} has no field {name!r}; is this an InternVL2.5 release "
                         "checkpoint (architectures InternVLChatModel)?")
    return config[name]


def read_release_config(src_dir: str | Path) -> dict:
    """The original config.json, checked for what the conversion relies on."""
    path = Path(src_dir) / "config.json"
    if not path.exists():
        raise InputError(f"{path}: missing; --input must be an InternVL2.5 release directory")
    config = _read_json(path)
    architectures = config.get("architectures") or []
    if "InternVLChatModel" not in architectures:
        hint = (" (already the native layout)" if config.get("model_type") == "internvl" else "")
        raise InputError(f"{path}: field 'architectures' is {architectures}, not "
                         f"['InternVLChatModel']{hint}; nothing to convert")
    llm = _field(config, "llm_config", "config.json", path)
    _field(config, "vision_config", "config.json", path)
    llm_arch = (llm.get("architectures") or [None])[0]
    if llm_arch not in LLM_ARCHITECTURES:
        raise InputError(f"{path}: field 'llm_config.architectures' is {llm.get('architectures')}; "
                         f"the converter knows {sorted(LLM_ARCHITECTURES)}")
    ps_version = config.get("ps_version", "v1")
    if ps_version != "v2":
        raise InputError(f"{path}: field 'ps_version' is {ps_version!r}; transformers' InternVL "
                         "implements the 'v2' pixel shuffle only (every InternVL2.5 release)")
    template = config.get("template")
    if template not in CHATML_TEMPLATES:
        raise InputError(f"{path}: field 'template' is {template!r}; the native chat template is "
                         f"ChatML, which matches the release templates {list(CHATML_TEMPLATES)}")
    _text_config(llm, path)  # their checks of the fields, before any tensor is read
    _vision_config(config["vision_config"], path)
    image_size = config.get("force_image_size") or config["vision_config"]["image_size"]
    if image_size != config["vision_config"]["image_size"]:
        raise InputError(f"{path}: field 'force_image_size' ({image_size}) differs from "
                         f"'vision_config.image_size' ({config['vision_config']['image_size']}); "
                         "the native model has one image size")
    return config


def _rope_parameters(llm: dict, path: Path) -> dict:
    theta = llm.get("rope_theta", 10000.0)
    scaling = llm.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "dynamic"):
        raise InputError(f"{path}: field 'llm_config.rope_scaling' is {scaling}; the converter "
                         "knows the types 'linear' and 'dynamic'")
    return {"rope_type": kind, "rope_theta": theta, "factor": float(scaling["factor"])}


def _text_config(llm: dict, path: Path) -> dict:
    """The native text config (a dict for transformers' Llama / Qwen2 config) of `llm_config`."""
    arch = llm["architectures"][0]
    model_type, _ = LLM_ARCHITECTURES[arch]
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "vocab_size")
    for key in keys:
        _field(llm, key, "llm_config", path)
    text = {key: llm[key] for key in keys}
    heads = llm["num_attention_heads"]
    text.update(
        model_type=model_type,
        num_key_value_heads=llm.get("num_key_value_heads", heads),
        hidden_act=llm.get("hidden_act", "silu"),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        max_position_embeddings=llm.get("max_position_embeddings", 32768),
        initializer_range=llm.get("initializer_range", 0.02),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        rope_parameters=_rope_parameters(llm, path),
        bos_token_id=llm.get("bos_token_id"), eos_token_id=llm.get("eos_token_id"),
        pad_token_id=llm.get("pad_token_id"), use_cache=True,
    )
    if arch == "InternLM2ForCausalLM":
        # InternLM2's one `bias` flag covers wqkv and wo, as Llama's attention_bias covers q/k/v/o.
        text.update(attention_bias=bool(llm.get("bias", False)), mlp_bias=False,
                    head_dim=llm["hidden_size"] // heads)
    elif arch == "LlamaForCausalLM":
        text.update(attention_bias=bool(llm.get("attention_bias", False)),
                    mlp_bias=bool(llm.get("mlp_bias", False)),
                    head_dim=llm.get("head_dim") or llm["hidden_size"] // heads)
    else:  # Qwen2: q/k/v always have a bias
        text.update(use_sliding_window=bool(llm.get("use_sliding_window", False)),
                    sliding_window=llm.get("sliding_window"),
                    max_window_layers=llm.get("max_window_layers", llm["num_hidden_layers"]))
    return text


def _vision_config(vision: dict, path: Path) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "image_size", "patch_size")
    for key in keys:
        _field(vision, key, "vision_config", path)
    out = {key: vision[key] for key in keys}
    for key in ("qkv_bias", "norm_type"):  # InternVisionConfig's defaults differ between sizes
        _field(vision, key, "vision_config", path)
    dropout = vision.get("attention_dropout", 0.0)
    out.update(
        num_channels=vision.get("num_channels", 3),
        attention_bias=bool(vision["qkv_bias"]),
        use_qk_norm=bool(vision.get("qk_normalization", False)),
        norm_type=vision["norm_type"],
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        hidden_act=vision.get("hidden_act", "gelu"),
        initializer_range=vision.get("initializer_range", 0.02),
        attention_dropout=dropout, projection_dropout=dropout,
        # InternViT has no final norm and no pooling: the mean-pooling flavour keeps the last
        # hidden state as it is.
        use_mean_pooling=True, use_absolute_position_embeddings=True, use_mask_token=False,
    )
    return out


def native_config(release: dict, image_token_id: int, path: Path) -> dict:
    """The native config.json (model_type "internvl") of a release config.json."""
    text = _text_config(release["llm_config"], path)
    vision = _vision_config(release["vision_config"], path)
    ratio = float(release.get("downsample_ratio", 0.5))
    grid = vision["image_size"] // vision["patch_size"]
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": image_token_id,
        "image_seq_length": int(grid * grid * ratio * ratio),
        "downsample_ratio": ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": int(release.get("select_layer", -1)),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


# ---------------------------------------------------------------------------------------------
# Tensor names: the release tensors a config implies (with shapes), and the rules that rename or
# split each into native (on-disk "-hf" layout) tensors.
# ---------------------------------------------------------------------------------------------


def _lm_head_names(release: dict) -> tuple[str, str]:
    """(output projection, input embedding) release names of the language model."""
    if release["llm_config"]["architectures"][0] == "InternLM2ForCausalLM":
        return "language_model.output.weight", "language_model.model.tok_embeddings.weight"
    return "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"


def release_tensor_shapes(release: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a release checkpoint with this config.json must hold, with its shape. With
    tie_word_embeddings the output projection is the embedding and is not listed (some exports
    still carry a copy: see `_check_tensors`)."""
    vision, llm = release["vision_config"], release["llm_config"]
    d_v, f_v = vision["hidden_size"], vision["intermediate_size"]
    c, p = vision.get("num_channels", 3), vision["patch_size"]
    grid = vision["image_size"] // p
    shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, d_v),
        "vision_model.embeddings.position_embedding": (1, grid * grid + 1, d_v),
        "vision_model.embeddings.patch_embedding.weight": (d_v, c, p, p),
        "vision_model.embeddings.patch_embedding.bias": (d_v,),
    }
    layer_norm = vision["norm_type"] == "layer_norm"
    for i in range(vision["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        shapes |= {pre + "ls1": (d_v,), pre + "ls2": (d_v,),
                   pre + "attn.qkv.weight": (3 * d_v, d_v),
                   pre + "attn.proj.weight": (d_v, d_v), pre + "attn.proj.bias": (d_v,),
                   pre + "mlp.fc1.weight": (f_v, d_v), pre + "mlp.fc1.bias": (f_v,),
                   pre + "mlp.fc2.weight": (d_v, f_v), pre + "mlp.fc2.bias": (d_v,)}
        for norm in ("norm1", "norm2"):
            shapes[pre + norm + ".weight"] = (d_v,)
            if layer_norm:
                shapes[pre + norm + ".bias"] = (d_v,)
        if vision["qkv_bias"]:
            shapes[pre + "attn.qkv.bias"] = (3 * d_v,)
        if vision.get("qk_normalization", False):
            shapes[pre + "attn.q_norm.weight"] = (d_v,)
            shapes[pre + "attn.k_norm.weight"] = (d_v,)
    ratio = float(release.get("downsample_ratio", 0.5))
    d_in, d = int(d_v * round(1 / ratio) ** 2), llm["hidden_size"]
    shapes |= {"mlp1.0.weight": (d_in,), "mlp1.0.bias": (d_in,), "mlp1.1.weight": (d, d_in),
               "mlp1.1.bias": (d,), "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,)}

    arch = llm["architectures"][0]
    n, v, f = llm["num_attention_heads"], llm["vocab_size"], llm["intermediate_size"]
    k = llm.get("num_key_value_heads", n)
    h = llm.get("head_dim") or d // n
    tied = bool(llm.get("tie_word_embeddings", False))
    lm = "language_model."
    if arch == "InternLM2ForCausalLM":
        bias = bool(llm.get("bias", False))
        shapes[lm + "model.tok_embeddings.weight"] = (v, d)
        for i in range(llm["num_hidden_layers"]):
            pre = f"{lm}model.layers.{i}."
            shapes |= {pre + "attention.wqkv.weight": ((n + 2 * k) * h, d),
                       pre + "attention.wo.weight": (d, n * h),
                       pre + "feed_forward.w1.weight": (f, d),
                       pre + "feed_forward.w3.weight": (f, d),
                       pre + "feed_forward.w2.weight": (d, f),
                       pre + "attention_norm.weight": (d,), pre + "ffn_norm.weight": (d,)}
            if bias:
                shapes[pre + "attention.wqkv.bias"] = ((n + 2 * k) * h,)
                shapes[pre + "attention.wo.bias"] = (d,)
            shapes[lm + "model.norm.weight"] = (d,)
        if not tied:
            shapes[lm + "output.weight"] = (v, d)
        return shapes

    qwen2 = arch == "Qwen2ForCausalLM"
    qkv_bias = qwen2 or bool(llm.get("attention_bias", False))
    o_bias = not qwen2 and bool(llm.get("attention_bias", False))
    mlp_bias = not qwen2 and bool(llm.get("mlp_bias", False))
    shapes[lm + "model.embed_tokens.weight"] = (v, d)
    for i in range(llm["num_hidden_layers"]):
        pre = f"{lm}model.layers.{i}."
        shapes |= {pre + "self_attn.q_proj.weight": (n * h, d),
                   pre + "self_attn.k_proj.weight": (k * h, d),
                   pre + "self_attn.v_proj.weight": (k * h, d),
                   pre + "self_attn.o_proj.weight": (d, n * h),
                   pre + "mlp.gate_proj.weight": (f, d), pre + "mlp.up_proj.weight": (f, d),
                   pre + "mlp.down_proj.weight": (d, f),
                   pre + "input_layernorm.weight": (d,),
                   pre + "post_attention_layernorm.weight": (d,)}
        if qkv_bias:
            shapes |= {pre + "self_attn.q_proj.bias": (n * h,),
                       pre + "self_attn.k_proj.bias": (k * h,),
                       pre + "self_attn.v_proj.bias": (k * h,)}
        if o_bias:
            shapes[pre + "self_attn.o_proj.bias"] = (d,)
        if mlp_bias:
            shapes |= {pre + "mlp.gate_proj.bias": (f,), pre + "mlp.up_proj.bias": (f,),
                       pre + "mlp.down_proj.bias": (d,)}
    shapes[lm + "model.norm.weight"] = (d,)
    if not tied:
        shapes[lm + "lm_head.weight"] = (v, d)
    return shapes


Split = Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _split_vision_qkv(array: np.ndarray) -> tuple[np.ndarray, ...]:
    """InternViT's qkv rows are [q; k; v], each of the full width."""
    return tuple(np.split(array, 3, axis=0))


def _split_internlm2_wqkv(num_heads: int, num_kv_heads: int) -> Split:
    groups = num_heads // num_kv_heads

    def split(array: np.ndarray) -> tuple[np.ndarray, ...]:
        rest = array.shape[1:]  # (D,) for the weight, () for the bias
        head_dim = array.shape[0] // (num_kv_heads * (groups + 2))
        qkv = array.reshape(num_kv_heads, groups + 2, head_dim, *rest)
        q = qkv[:, :groups].reshape(num_heads * head_dim, *rest)
        k = qkv[:, groups].reshape(num_kv_heads * head_dim, *rest)
        v = qkv[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
        return q, k, v

    return split


# (release-name regex, native name templates, split or None). Native names are the on-disk layout
# that transformers' save_pretrained writes for InternVLForConditionalGeneration.
_VISION_RULES = (
    (r"vision_model\.embeddings\.class_embedding", ("vision_tower.embeddings.cls_token",)),
    (r"vision_model\.embeddings\.position_embedding",
     ("vision_tower.embeddings.position_embeddings",)),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
     (r"vision_tower.embeddings.patch_embeddings.projection.\1",)),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls(1|2)",
     (r"vision_tower.encoder.layer.\1.lambda_\2",)),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)",
     tuple(rf"vision_tower.encoder.layer.\1.attention.{x}_proj.\2" for x in "qkv")),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
     (r"vision_tower.encoder.layer.\1.attention.projection_layer.\2",)),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight",
     (r"vision_tower.encoder.layer.\1.attention.\2.weight",)),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     (r"vision_tower.encoder.layer.\1.layernorm_before.\2",)),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
     (r"vision_tower.encoder.layer.\1.layernorm_after.\2",)),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
     (r"vision_tower.encoder.layer.\1.mlp.\2.\3",)),
    (r"mlp1\.0\.(weight|bias)", (r"multi_modal_projector.layer_norm.\1",)),
    (r"mlp1\.1\.(weight|bias)", (r"multi_modal_projector.linear_1.\1",)),
    (r"mlp1\.3\.(weight|bias)", (r"multi_modal_projector.linear_2.\1",)),
)
_INTERNLM2_RULES = (
    (r"language_model\.model\.tok_embeddings\.weight",
     ("language_model.model.embed_tokens.weight",)),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)",
     tuple(rf"language_model.model.layers.\1.self_attn.{x}_proj.\2" for x in "qkv")),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.(weight|bias)",
     (r"language_model.model.layers.\1.self_attn.o_proj.\2",)),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.weight",
     (r"language_model.model.layers.\1.mlp.gate_proj.weight",)),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.weight",
     (r"language_model.model.layers.\1.mlp.up_proj.weight",)),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.weight",
     (r"language_model.model.layers.\1.mlp.down_proj.weight",)),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.weight",
     (r"language_model.model.layers.\1.input_layernorm.weight",)),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.weight",
     (r"language_model.model.layers.\1.post_attention_layernorm.weight",)),
    (r"language_model\.model\.norm\.weight", ("language_model.model.norm.weight",)),
    (r"language_model\.output\.weight", ("language_model.lm_head.weight",)),
)
# Qwen2 / Llama language models are stored in transformers' names already.
_HF_LM_RULES = ((r"(language_model\..+)", (r"\1",)),)


def _rules(release: dict) -> list[tuple[re.Pattern, tuple[str, ...], Split | None]]:
    llm = release["llm_config"]
    family = LLM_ARCHITECTURES[llm["architectures"][0]][1]
    n = llm["num_attention_heads"]
    wqkv = _split_internlm2_wqkv(n, llm.get("num_key_value_heads", n))
    rules = []
    for pattern, targets in _VISION_RULES + (_INTERNLM2_RULES if family == "internlm2"
                                              else _HF_LM_RULES):
        split = None
        if len(targets) == 3:
            split = _split_vision_qkv if pattern.startswith("vision") else wqkv
        rules.append((re.compile(pattern), targets, split))
    return rules


def convert_tensor(name: str, array: np.ndarray, rules) -> dict[str, np.ndarray]:
    """Native tensors of one release tensor (`rules` from `_rules`)."""
    for pattern, targets, split in rules:
        match = pattern.fullmatch(name)
        if match:
            parts = split(array) if split else (array,)
            return {match.expand(target): np.ascontiguousarray(part)
                    for target, part in zip(targets, parts, strict=True)}
    raise AssertionError(f"no rule for {name}")  # release_tensor_shapes lists only ruled names


# ---------------------------------------------------------------------------------------------
# Reading the release shards
# ---------------------------------------------------------------------------------------------


def _shard_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name -> (shape, safetensors dtype) of one shard, from its header alone."""
    header = SafetensorsFile(path).header
    return {name: (tuple(info["shape"]), info["dtype"]) for name, info in header.items()}


def release_weight_files(src_dir: Path) -> tuple[Path, dict[str, Path]]:
    """(the file that lists the tensors, tensor name -> shard) of a release directory."""
    index = src_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = _field(_read_json(index), "weight_map", index.name, index)
        files = {}
        for name, filename in weight_map.items():
            if not (src_dir / filename).exists():
                raise InputError(f"{index} lists {filename} for tensor {name}, but "
                                 f"{src_dir / filename} is missing; download the whole checkpoint")
            files[name] = src_dir / filename
        return index, files
    single = src_dir / "model.safetensors"
    if single.exists():
        return single, dict.fromkeys(_shard_header(single), single)
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in src_dir.glob(ext))
    if pickles:
        raise InputError(f"{src_dir} holds pickle weights only ({', '.join(pickles[:3])}); "
                         "loading them can run arbitrary code, so the converter reads safetensors "
                         "only: convert them to safetensors first (e.g. load with transformers "
                         "and save_pretrained(..., safe_serialization=True))")
    raise InputError(f"{src_dir}: no model.safetensors or model.safetensors.index.json")


def _check_tensors(release: dict, listing: Path, files: dict[str, Path]) -> set[str]:
    """Check names and shapes against config.json before anything is written. Returns the
    release tensors to skip: a tied output projection (equal to the embedding, as the original
    model ties them when it loads) and recomputed rotary buffers."""
    expected = release_tensor_shapes(release)
    missing = [name for name in expected if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{listing}: tensor {missing[0]!r} is missing{more}; the config.json "
                         "implies it: download the whole checkpoint, or fix config.json")
    skip = {name for name in files if name.endswith("rotary_emb.inv_freq")}
    head, embedding = _lm_head_names(release)
    if head in files and head not in expected:  # tied
        skip.add(head)
        expected = {**expected, head: expected[embedding]}
    headers: dict[Path, dict] = {}
    for name, file in files.items():
        if name in skip and name != head:
            continue
        if name not in expected:
            raise InputError(f"{file}: tensor {name!r} is not part of an InternVL2.5 "
                             f"{release['llm_config']['architectures'][0]} checkpoint with this "
                             "config.json; the converter drops nothing silently")
        header = headers.get(file) or headers.setdefault(file, _shard_header(file))
        if name not in header:
            raise InputError(f"{listing} puts tensor {name!r} in {file}, which lacks it")
        if header[name][0] != expected[name]:
            raise InputError(f"{file}: tensor {name!r} has shape {list(header[name][0])}, but "
                             f"config.json implies {list(expected[name])}")
    if head in skip and not np.array_equal(_read_tensor(files[head], head),
                                           _read_tensor(files[embedding], embedding)):
        raise InputError(f"{files[head]}: tensor {head!r} differs from {embedding!r}, but "
                         f"{listing.parent / 'config.json'} field "
                         "'llm_config.tie_word_embeddings' is true (the original model would "
                         "replace it by the embedding): fix the config or the checkpoint")
    return skip


def _read_tensor(path: Path, name: str) -> np.ndarray:
    return SafetensorsFile(path).tensor(name)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _added_tokens(src_dir: Path) -> list[dict]:
    """The tokens added on top of the base vocabulary: tokenizer_config.json's
    added_tokens_decoder, or added_tokens.json; each {"id", "content", "special", ...}."""
    config_path = src_dir / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    tokens = []
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        tokens.append({**entry, "id": int(token_id)})
    added_path = src_dir / "added_tokens.json"
    if not tokens and added_path.exists():
        for content, token_id in _read_json(added_path).items():
            tokens.append({"id": int(token_id), "content": content, "special": True})
    return sorted(tokens, key=lambda t: t["id"])


def build_sentencepiece_tokenizer(model_file: str | Path, added_tokens: Sequence[dict] = (),
                                  add_bos_token: bool = True, add_eos_token: bool = False):
    """A fast `tokenizers.Tokenizer` that tokenizes like InternLM2's sentencepiece tokenizer.

    InternLM2Tokenizer (a slow transformers tokenizer) splits the text at its added tokens and runs
    `sp.encode` on each piece in between, then puts <s> first (add_bos_token). Here: the pieces
    and their ids, a BPE whose merge ranks follow the sentencepiece scores (sentencepiece merges
    the pair whose result scores highest), byte fallback, the dummy "▁" prefix on every piece when
    the model's normalizer adds one (sentencepiece encodes the whole piece as one sequence: no
    pre-tokenizer), and the added tokens with their ids.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    path = Path(model_file)
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError; the message names no file
        raise InputError(f"{path}: not a sentencepiece model ({e})") from e
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise InputError(f"{path}: field 'trainer_spec.model_type' is "
                         f"{proto.trainer_spec.model_type}; InternLM2 tokenizers are BPE (2)")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    scores = {piece.piece: piece.score for piece in proto.pieces
              if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL}
    merges = []
    for merged, score in scores.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                                     unk_token=unk, fuse_unk=True,
                                     byte_fallback=proto.trainer_spec.byte_fallback))
    # sentencepiece's order: charsmap, whitespace clean-up, dummy prefix, whitespace escaping. A
    # normalizer (not the Metaspace pre-tokenizer, which adds no "▁" before a leading space) so
    # that " x" becomes "▁▁x" as sp.encode makes it; it runs on each piece between added tokens.
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # spaces only (Strip would take tabs too): other whitespace is the charsmap's business
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decode)

    control = [piece.piece for piece in proto.pieces
               if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL]
    user = [piece.piece for piece in proto.pieces
            if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])
    for entry in added_tokens:
        token = AddedToken(entry["content"], special=bool(entry.get("special", True)),
                           lstrip=bool(entry.get("lstrip", False)),
                           rstrip=bool(entry.get("rstrip", False)),
                           single_word=bool(entry.get("single_word", False)),
                           normalized=bool(entry.get("normalized", False)))
        if token.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        if tokenizer.token_to_id(entry["content"]) != entry["id"]:
            raise InputError(f"{path.parent / 'tokenizer_config.json'}: added token "
                             f"{entry['content']!r} has id {entry['id']}, but the sentencepiece "
                             f"model gives it {tokenizer.token_to_id(entry['content'])}: added "
                             "ids must follow the pieces in order")
    bos = proto.pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None
    eos = proto.pieces[proto.trainer_spec.eos_id].piece if proto.trainer_spec.eos_id >= 0 else None
    single, special = "$A", []
    if add_bos_token and bos:
        single, special = f"{bos} {single}", [(bos, vocab[bos])]
    if add_eos_token and eos:
        single, special = f"{single} {eos}", [*special, (eos, vocab[eos])]
    pair = single.replace("$A", "$A $B") if special else "$A $B"
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                             special_tokens=special)
    return tokenizer


def check_vocab(tokenizer, tokenizer_file: Path, embedding_rows: int, config_path: Path) -> None:
    """A tokenizer that fits the checkpoint: every id below the embedding rows (llm_config's
    `vocab_size`), and the image tokens present."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > embedding_rows:
        raise InputError(f"{tokenizer_file}: the tokenizer has {size} ids, more than the "
                         f"checkpoint's {embedding_rows} embedding rows ({config_path} field "
                         "'llm_config.vocab_size'); this tokenizer belongs to another model")
    missing = [t for t in IMAGE_TOKENS.values() if tokenizer.token_to_id(t) is None]
    if missing:
        raise InputError(f"{tokenizer_file}: the vocabulary (vocab_size {size}) lacks the image "
                         f"tokens {missing}; InternVL's tokenizer adds <img>, </img> and "
                         "<IMG_CONTEXT> (tokenizer_config.json 'added_tokens_decoder')")


def _load_tokenizer(src_dir: Path):
    """(tokenizers.Tokenizer, the file it came from, tokenizer_config.json's dict)."""
    from tokenizers import Tokenizer

    config_path = src_dir / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    if (src_dir / "tokenizer.model").exists():
        file = src_dir / "tokenizer.model"
        tokenizer = build_sentencepiece_tokenizer(
            file, _added_tokens(src_dir), add_bos_token=bool(config.get("add_bos_token", True)),
            add_eos_token=bool(config.get("add_eos_token", False)))
        return tokenizer, file, config
    if config.get("tokenizer_class") in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        # A class transformers ships: the original tokenizer itself, added tokens included.
        from transformers import Qwen2Tokenizer

        file = src_dir / ("tokenizer.json" if (src_dir / "tokenizer.json").exists()
                          else "vocab.json")
        tokenizer = Qwen2Tokenizer.from_pretrained(str(src_dir)).backend_tokenizer
        for entry in _added_tokens(src_dir):
            if tokenizer.token_to_id(entry["content"]) != entry["id"]:
                raise InputError(f"{config_path}: added token {entry['content']!r} has id "
                                 f"{entry['id']}, but the tokenizer gives it "
                                 f"{tokenizer.token_to_id(entry['content'])}")
        return tokenizer, file, config
    if (src_dir / "tokenizer.json").exists():
        file = src_dir / "tokenizer.json"
        return Tokenizer.from_file(str(file)), file, config
    raise InputError(f"{src_dir}: no tokenizer the converter can read (tokenizer.model, "
                     "tokenizer.json, or vocab.json + merges.txt with tokenizer_class "
                     "Qwen2Tokenizer); the release repositories ship one beside the weights")


def _token(config: dict, name: str, default: str | None) -> str | None:
    value = config.get(name, default)
    return value["content"] if isinstance(value, dict) else value


def _tokenizer_config(config: dict, tokenizer, sentencepiece: bool, embedding_rows: int) -> dict:
    """The native tokenizer_config.json: a plain fast tokenizer over tokenizer.json, with the
    named image tokens InternVLProcessor reads (tokenizer.start_image_token, ...)."""
    eos = _token(config, "eos_token", "</s>" if sentencepiece else "<|im_end|>")
    # transformers' InternVLProcessor also wants a `video_token` placeholder; naming one adds it
    # to the vocabulary, so only when the embedding has a row to spare for its id.
    named_tokens = dict(IMAGE_TOKENS)
    if tokenizer.get_vocab_size(with_added_tokens=True) < embedding_rows:
        named_tokens["video_token"] = "<video>"
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(config, "bos_token", "<s>" if sentencepiece else None),
        "eos_token": eos,
        "unk_token": _token(config, "unk_token", "<unk>" if sentencepiece else None),
        "pad_token": _token(config, "pad_token", eos),
        "model_max_length": config.get("model_max_length", 8192),
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "extra_special_tokens": named_tokens,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def _image_processor_config(release: dict, path: Path) -> dict:
    """GotOcr2's tiling with the release's settings: dynamic 1..max_dynamic_patch tiles of
    force_image_size pixels plus a thumbnail, ImageNet mean/std, bicubic resizing."""
    size = release["vision_config"]["image_size"]
    dynamic = bool(release.get("dynamic_image_size", True))
    if dynamic and not release.get("use_thumbnail", True):
        raise InputError(f"{path}: field 'use_thumbnail' is false; the native image processor "
                         "always appends the thumbnail tile to a tiled image")
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "do_resize": True, "size": {"height": size, "width": size},
        "crop_to_patches": True,
        "min_patches": int(release.get("min_dynamic_patch", 1)) if dynamic else 1,
        "max_patches": int(release.get("max_dynamic_patch", 12)) if dynamic else 1,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True, "resample": 3,
    }


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------


def _check_destination(src: Path, dst: Path) -> None:
    if dst.resolve() == src.resolve():
        raise InputError(f"--output {dst} is the input directory; give a new directory")
    if dst.exists() and any(dst.glob("model*.safetensors*")):
        raise InputError(f"{dst} already holds a checkpoint; give an empty or new directory "
                         "(stale shards would mix with the new ones)")


def convert_release_checkpoint(src_dir: str | Path, dst_dir: str | Path) -> ConvertReport:
    """Convert the release checkpoint in `src_dir` into the native layout in `dst_dir`.

    Everything is checked (config, tensor names and shapes, tokenizer against the embedding)
    before the first file is written."""
    src, dst = Path(src_dir), Path(dst_dir)
    release = read_release_config(src)
    config_path = src / "config.json"
    _check_destination(src, dst)
    listing, files = release_weight_files(src)
    skip = _check_tensors(release, listing, files)
    tokenizer, tokenizer_file, tokenizer_config = _load_tokenizer(src)
    embedding_rows = release["llm_config"]["vocab_size"]
    check_vocab(tokenizer, tokenizer_file, embedding_rows, config_path)
    image_token_id = tokenizer.token_to_id(IMAGE_TOKENS["context_image_token"])
    config = native_config(release, image_token_id, config_path)
    image_processor = _image_processor_config(release, config_path)
    embedding = _lm_head_names(release)[1]
    dtype = _shard_header(files[embedding])[embedding][1]
    config["dtype"] = {"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32")

    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dst / "tokenizer.json"))
    native_tokenizer = _tokenizer_config(tokenizer_config, tokenizer,
                                         tokenizer_file.name == "tokenizer.model", embedding_rows)
    _write_json(dst / "tokenizer_config.json", native_tokenizer)
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_json(dst / "preprocessor_config.json", image_processor)
    _write_json(dst / "processor_config.json", {"processor_class": "InternVLProcessor",
                                                "image_seq_length": config["image_seq_length"]})
    # The release chat loop stops at the template's separator <|im_end|>, not only at eos.
    stops = {tokenizer.token_to_id(t) for t in ("<|im_end|>", native_tokenizer["eos_token"])}
    _write_json(dst / "generation_config.json",
                {"eos_token_id": sorted(i for i in stops if i is not None)})
    _write_json(dst / "config.json", config)

    rules = _rules(release)
    shard_files = sorted(set(files.values()))
    weight_map, total_size = {}, 0
    for number, shard_path in enumerate(shard_files, start=1):
        # Renamed tensors stay views of the memory-mapped input; only split ones are copies.
        shard = SafetensorsFile(shard_path)
        out: dict[str, np.ndarray] = {}
        for name in shard.header:
            if files.get(name) == shard_path and name not in skip:
                out |= convert_tensor(name, shard.tensor(name), rules)
        out_name = ("model.safetensors" if len(shard_files) == 1
                    else f"model-{number:05d}-of-{len(shard_files):05d}.safetensors")
        write_safetensors(dst / out_name, out)
        weight_map |= dict.fromkeys(out, out_name)
        total_size += sum(a.nbytes for a in out.values())
    if len(shard_files) > 1:
        _write_json(dst / "model.safetensors.index.json",
                    {"metadata": {"total_size": total_size},
                     "weight_map": dict(sorted(weight_map.items()))})
    return ConvertReport(output_dir=dst, llm_architecture=release["llm_config"]["architectures"][0],
                         num_tensors=len(weight_map), num_shards=len(shard_files),
                         image_token_id=image_token_id,
                         vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))
