"""Model families as plug-ins: what the trainer, sampler, evaluation, verify-port, export and plan
need from a model, gathered in one `ModelFamily` per family and chosen from a checkpoint's
config.json `model_type`.

    family = families.for_model_dir(model_dir)        # or families.for_config(model.config)
    model = family.load_model(model_dir, mesh=mesh, param_dtype="bfloat16")
    processor = family.load_processor(model_dir, ImageOptions.from_data_config(config.data))
    row = family.prompt_row(processor.encode(question=..., images=[...]), model.config)
    batch = family.collate_prompts([row, ...], buckets, pad_token_id=processor.pad_token_id)

Everything past `collate_prompts` is family-independent: a `PromptBatch` (sampler.py) holds
token ids, positions [3, B, T] (M-RoPE; 1-D rotary repeats one row), the merged vision token that
fills each image slot, and the family's own vision inputs (a pytree the family's
`encode_images` reads). A family's model class has the method contract of
`models/qwen2_5_vl.Qwen25VL`: `encode_images`, `embed`, `decode`, `text_rotary_table`,
`decode_step`, `logits` and the teacher-forced `__call__`.

Each family lives in its own module here and imports its model; nothing outside eureka_jax/models,
eureka_jax/families and the family's processing code imports a model class.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eureka_jax.errors import InputError

# model_type in config.json -> the module defining that family's FAMILY.
_MODULES = {
    "qwen2_5_vl": "eureka_jax.families.qwen2_5_vl",
    "internvl": "eureka_jax.families.internvl",
}


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family's entry points. Signatures (checked by tests/test_families.py):

    read_config(model_dir: Path, **runtime) -> config     runtime: param_dtype, compute_dtype,
                                                           remat, logits_chunk, attention_impl,
                                                           freeze_vision
    load_model(model_dir, mesh=None, rules=..., **runtime) -> model, streamed onto `mesh`
    init_model(config, seed=0, mesh=None, rules=...) -> model with random weights
    export_model(model, output_dir, *, source_dir=None, dtype=None) -> Path (HF directory)
    load_processor(model_dir, images: ImageOptions | None = None) -> processor: .encode(
        question=, images=, system=, max_length=, name=), .tokenizer, .pad_token_id,
        .stop_token_ids
    prompt_row(encoded, config, *, name) -> row: a frozen dataclass of NumPy arrays with
        `num_tokens` and `num_patches` (the vision size a patch bucket bounds)
    collate_prompts(rows, buckets, *, pad_token_id, prompt_keys=None) -> PromptBatch (NumPy)
    prompt_rows(batch, config) -> rows of a collated batch (HF arrays -> rows)
    port_inputs(arrays, config, *, source) -> PromptBatch with every token at its input slot
    verification_cases(processor) -> {name: HF processor arrays} for verify-port
    load_reference(model_dir) -> transformers model (float32, eval; tests and verify only)
    reference_logits(hf_model, arrays, config) -> np.ndarray (B, T, V)
    make_tiny_model_dir(directory, seed=0) -> model: a tiny random model with a local tokenizer
        saved as a HF directory (the CPU demo's starting point)
    abstract_vision(rows, size, config, sharding) -> the vision inputs as ShapeDtypeStructs for
        a vision bucket of `size` (patches or tiles per prompt), for `eureka-jax plan`
    vision_flops(config, rows, size) -> forward FLOPs of the vision encoder on such inputs
    """

    name: str
    model_types: tuple[str, ...]
    config_class: type
    model_class: type
    row_class: type
    read_config: Callable[..., Any]
    load_model: Callable[..., Any]
    init_model: Callable[..., Any]
    export_model: Callable[..., Path]
    load_processor: Callable[..., Any]
    prompt_row: Callable[..., Any]
    collate_prompts: Callable[..., Any]
    prompt_rows: Callable[..., list]
    port_inputs: Callable[..., Any]
    verification_cases: Callable[..., dict]
    load_reference: Callable[..., Any]
    reference_logits: Callable[..., Any]
    make_tiny_model_dir: Callable[..., Any]
    abstract_vision: Callable[..., Any]
    vision_flops: Callable[..., float]


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """Image settings that override a checkpoint's processor config (None keeps its own). Each
    family reads the ones it has: Qwen2.5-VL min/max_pixels; InternVL max_tiles (per image) and
    vision_budget (tiles per prompt, the largest patch bucket: a prompt over it is refused when
    it is encoded, so the data pipeline reports it as a bad record)."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    max_tiles: int | None = None
    vision_budget: int | None = None

    @classmethod
    def from_data_config(cls, data: Any) -> ImageOptions:
        """From a training config's data section."""
        return cls(min_pixels=data.min_pixels, max_pixels=data.max_pixels,
                   max_tiles=data.max_tiles or None, vision_budget=max(data.patch_buckets))


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def get(name: str) -> ModelFamily:
    """The family registered as `name` (a config.json model_type)."""
    if name not in _MODULES:
        raise InputError(f"model family {name!r} is not supported; eureka_jax supports "
                         f"{', '.join(_MODULES)} (config.json 'model_type')")
    return importlib.import_module(_MODULES[name]).FAMILY


def for_model_dir(model_dir: str | os.PathLike) -> ModelFamily:
    """The family of a local HF directory, from its config.json `model_type`."""
    from eureka_jax.hf_io import read_config_json

    model_type = read_config_json(Path(model_dir)).get("model_type")
    if model_type not in _MODULES:
        raise InputError(f"{Path(model_dir) / 'config.json'}: model_type {model_type!r} is not "
                         f"supported; eureka_jax supports {', '.join(_MODULES)}")
    return get(model_type)


def _family_of(value: Any, kind: str) -> ModelFamily:
    """The family whose `kind` class ("row_class", "config_class") `value` is an instance of."""
    for name in _MODULES:
        family = get(name)
        if isinstance(value, getattr(family, kind)):
            return family
    what = "prompt row" if kind == "row_class" else "config"
    raise TypeError(f"{type(value).__name__} is not the {what} of a registered model family")


def for_row(row: Any) -> ModelFamily:
    """The family whose prompt-row class `row` is."""
    return _family_of(row, "row_class")


def collate_prompts(rows, buckets, *, pad_token_id: int, prompt_keys=None):
    """Rows of one family -> its PromptBatch (NumPy), left-padded to the buckets: the rollout,
    update and evaluation call this and never see a family's vision layout."""
    if not rows:
        raise InputError("cannot collate an empty batch of prompts")
    return for_row(rows[0]).collate_prompts(rows, buckets, pad_token_id=pad_token_id,
                                            prompt_keys=prompt_keys)


def for_config(config: Any) -> ModelFamily:
    """The family whose config class `config` is (a model's `.config`)."""
    return _family_of(config, "config_class")


def row_to_arrays(row: Any, prefix: str) -> dict:
    """A prompt row as flat NumPy arrays (every field, and its family's name) under `prefix`:
    what checkpoints store and processes exchange (no pickles)."""
    import numpy as np

    arrays = {f"{prefix}/row/{f.name}": np.asarray(getattr(row, f.name))
              for f in dataclasses.fields(row)}
    arrays[f"{prefix}/family"] = np.asarray(for_row(row).name)
    return arrays


def row_from_arrays(arrays: dict, prefix: str) -> Any:
    """The inverse of `row_to_arrays`."""
    import numpy as np

    family = get(str(arrays[f"{prefix}/family"]))
    fields = {}
    for field in dataclasses.fields(family.row_class):
        value = np.asarray(arrays[f"{prefix}/row/{field.name}"])
        fields[field.name] = value.item() if value.ndim == 0 else value
    return family.row_class(**fields)
