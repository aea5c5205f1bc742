"""InternVL checkpoints in and out: transformers' native InternVL safetensors <-> the port.

The generic machinery (memory-mapped safetensors, per-shard streamed loading onto a mesh, sharded
writing) is eureka_jax/hf_io.py's; this module only supplies InternVL's name table.

Names. transformers holds an InternVLForConditionalGeneration as `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*` and `lm_head.weight`, but its
save_pretrained writes (and the OpenGVLab "-hf" hub repositories hold) the older layout
`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*` and
`language_model.lm_head.weight`. Loading accepts both; export writes what save_pretrained writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from eureka_jax import hf_io, sharding
from eureka_jax.models.internvl import InternVL, InternVLConfig

# (HF key in transformers' in-memory layout, parameter path, layout); see hf_io.NameTable.
_RULES: tuple[tuple[str, str, str], ...] = (
    ("model.vision_tower.embeddings.patch_embeddings.projection.weight",
     "vision_tower.patch_embed.kernel", "conv"),
    ("model.vision_tower.embeddings.patch_embeddings.projection.bias",
     "vision_tower.patch_embed.bias", "same"),
    ("model.vision_tower.embeddings.cls_token", "vision_tower.cls_token", "same"),
    ("model.vision_tower.embeddings.position_embeddings", "vision_tower.position_embeddings",
     "same"),
    ("model.vision_tower.encoder.layer.{i}.{norm}.weight", "vision_tower.layers.{norm}.scale",
     "same"),
    ("model.vision_tower.encoder.layer.{i}.{norm}.bias", "vision_tower.layers.{norm}.bias",
     "same"),
    ("model.vision_tower.encoder.layer.{i}.lambda_{n}", "vision_tower.layers.lambda_{n}", "same"),
    ("model.vision_tower.encoder.layer.{i}.attention.{name}_norm.weight",
     "vision_tower.layers.attention.{name}_norm.scale", "same"),
    ("model.vision_tower.encoder.layer.{i}.attention.{name}.weight",
     "vision_tower.layers.attention.{name}.kernel", "linear"),
    ("model.vision_tower.encoder.layer.{i}.attention.{name}.bias",
     "vision_tower.layers.attention.{name}.bias", "same"),
    ("model.vision_tower.encoder.layer.{i}.mlp.{name}.weight",
     "vision_tower.layers.mlp.{name}.kernel", "linear"),
    ("model.vision_tower.encoder.layer.{i}.mlp.{name}.bias",
     "vision_tower.layers.mlp.{name}.bias", "same"),
    ("model.vision_tower.layernorm.weight", "vision_tower.layernorm.scale", "same"),
    ("model.vision_tower.layernorm.bias", "vision_tower.layernorm.bias", "same"),
    ("model.multi_modal_projector.layer_norm.weight", "multi_modal_projector.layer_norm.scale",
     "same"),
    ("model.multi_modal_projector.layer_norm.bias", "multi_modal_projector.layer_norm.bias",
     "same"),
    ("model.multi_modal_projector.{name}.weight", "multi_modal_projector.{name}.kernel",
     "linear"),
    ("model.multi_modal_projector.{name}.bias", "multi_modal_projector.{name}.bias", "same"),
    ("model.language_model.embed_tokens.weight", "embed_tokens", "same"),
    ("model.language_model.layers.{i}.{norm}.weight", "layers.{norm}.scale", "same"),
    ("model.language_model.layers.{i}.self_attn.{name}.weight",
     "layers.self_attn.{name}.kernel", "linear"),
    ("model.language_model.layers.{i}.self_attn.{name}.bias", "layers.self_attn.{name}.bias",
     "same"),
    ("model.language_model.layers.{i}.mlp.{name}.weight", "layers.mlp.{name}.kernel", "linear"),
    ("model.language_model.norm.weight", "norm.scale", "same"),
    ("lm_head.weight", "lm_head.kernel", "linear"),
)
# save_pretrained's layout -> the in-memory one (the first matching prefix is replaced).
_ALIASES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
NAMES = hf_io.NameTable("InternVL", _RULES, _ALIASES,
                        droppable=("lm_head.weight", "language_model.lm_head.weight"))
_SAVED_PREFIXES = tuple((new, old) for old, new in _ALIASES)


def saved_key(key: str) -> str:
    """The name transformers' save_pretrained gives an in-memory tensor name."""
    for new, old in _SAVED_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def read_config(model_dir: str | os.PathLike, **runtime) -> InternVLConfig:
    return InternVLConfig.from_hf_dict(hf_io.read_config_json(Path(model_dir)), **runtime)


def load_model(model: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
               rules=sharding.DEFAULT_RULES, **runtime) -> InternVL:
    """An InternVL with weights from a HF directory (or hub id), each device reading only its
    shards of each tensor when `mesh` is given. `runtime` sets InternVLConfig's runtime fields
    (param_dtype, compute_dtype, remat, freeze_vision, logits_chunk, attention_impl)."""
    model_dir = hf_io.resolve_model_dir(model)
    return hf_io.load_weights(InternVL, read_config(model_dir, **runtime), model_dir, mesh, rules,
                              NAMES)


def hf_tensors(model: InternVL, dtype=None):
    """(saved HF key, host array) pairs, one parameter (of one layer) at a time."""
    v = model.config.vision
    conv = (v.num_channels, v.patch_size, v.patch_size)
    for key, array in hf_io.param_tensors(model, NAMES, conv, dtype):
        yield saved_key(key), array


def export_model(model: InternVL, output_dir: str | os.PathLike, *,
                 source_dir: str | os.PathLike | None = None, dtype: str | None = None,
                 max_shard_bytes: int = 4 << 30) -> Path:
    """Write a HF directory that transformers loads as InternVLForConditionalGeneration:
    config.json, safetensors (+ index), and the source directory's tokenizer files."""
    np_dtype = None if dtype is None else hf_io.EXPORT_DTYPES[dtype]
    return hf_io.write_checkpoint(output_dir, hf_tensors(model, np_dtype),
                                  model.config.to_hf_dict(), source_dir=source_dir, dtype=dtype,
                                  max_shard_bytes=max_shard_bytes)


def init_model(config: InternVLConfig, seed: int = 0, mesh=None,
               rules=sharding.DEFAULT_RULES) -> InternVL:
    """A randomly initialised model, created directly in its shards when a mesh is given."""
    return hf_io.init_sharded(InternVL, config, seed, mesh, rules)


def host_params(model: InternVL) -> dict[str, np.ndarray]:
    """Every parameter as a host array by its dotted path (for tests and tools)."""
    return {".".join(map(str, path)): np.asarray(variable[...])
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
