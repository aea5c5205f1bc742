"""Hugging Face checkpoints in and out: safetensors <-> the Flax port's parameters.

Loading reads each tensor straight into the shards its parameter needs
(`jax.make_array_from_callback` over a memory-mapped file), so a checkpoint larger than one host's
memory is never materialised whole. The safetensors format is read and written here directly (an
8-byte header length, a JSON header, raw little-endian data) because NumPy has no bfloat16 and the
real Qwen2.5-VL checkpoints are bfloat16; ml_dtypes supplies the dtype.

The mapping between Hugging Face names and parameter paths is one declarative table, `_RULES`.
The port stacks the decoder layers and the vision blocks (a leading layer axis, see
models/qwen2_5_vl.py): Hugging Face's `model.layers.{i}.X` is layer i of the port's `layers.X`,
loaded per device from the per-layer tensors and exported back to them one layer at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import struct as pystruct
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from eureka_jax import distributed, sharding
from eureka_jax.errors import InputError
from eureka_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from eureka_jax.workdirs import as_path

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
# Files a HF directory carries besides weights and config: copied verbatim on export.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json", "generation_config.json",
)

# ---------------------------------------------------------------------------------------------
# Name mapping: (HF key template, parameter path template, layout). A {placeholder} stands for one
# dotted component; {i} in a HF key is a layer index, the index along the port's leading layer
# axis. Layout "linear": HF [out, in] <-> ours [in, out]; "conv": Conv3d [D, C, T, p, p] <->
# [C*T*p*p, D]; "same": identical layout.
# ---------------------------------------------------------------------------------------------

_RULES: tuple[tuple[str, str, str], ...] = (
    ("visual.patch_embed.proj.weight", "visual.patch_embed", "conv"),
    ("visual.blocks.{i}.norm{n}.weight", "visual.blocks.norm{n}.scale", "same"),
    ("visual.blocks.{i}.attn.{name}.weight", "visual.blocks.attn.{name}.kernel", "linear"),
    ("visual.blocks.{i}.attn.{name}.bias", "visual.blocks.attn.{name}.bias", "same"),
    ("visual.blocks.{i}.mlp.{name}.weight", "visual.blocks.mlp.{name}.kernel", "linear"),
    ("visual.blocks.{i}.mlp.{name}.bias", "visual.blocks.mlp.{name}.bias", "same"),
    ("visual.merger.ln_q.weight", "visual.merger.ln_q.scale", "same"),
    ("visual.merger.mlp.0.weight", "visual.merger.fc1.kernel", "linear"),
    ("visual.merger.mlp.0.bias", "visual.merger.fc1.bias", "same"),
    ("visual.merger.mlp.2.weight", "visual.merger.fc2.kernel", "linear"),
    ("visual.merger.mlp.2.bias", "visual.merger.fc2.bias", "same"),
    ("model.embed_tokens.weight", "embed_tokens", "same"),
    ("model.layers.{i}.{norm}.weight", "layers.{norm}.scale", "same"),
    ("model.layers.{i}.self_attn.{name}.weight", "layers.self_attn.{name}.kernel", "linear"),
    ("model.layers.{i}.self_attn.{name}.bias", "layers.self_attn.{name}.bias", "same"),
    ("model.layers.{i}.mlp.{name}.weight", "layers.mlp.{name}.kernel", "linear"),
    ("model.norm.weight", "norm.scale", "same"),
    ("lm_head.weight", "lm_head.kernel", "linear"),
)
# transformers' in-memory names, which some conversions save: normalised to hub-style first.
_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _template_regex(template: str) -> re.Pattern:
    pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^.]+)", re.escape(template))
    return re.compile(pattern + "$")


@dataclasses.dataclass(frozen=True)
class NameTable:
    """One model family's (HF key template, parameter path template, layout) rules, the key
    prefixes normalised before matching (`aliases`), and the HF keys a checkpoint may carry that
    the port drops (`droppable`: a tied checkpoint's stored lm_head)."""

    family: str
    rules: tuple[tuple[str, str, str], ...]
    aliases: tuple[tuple[str, str], ...] = ()
    droppable: tuple[str, ...] = ()

    @functools.cached_property
    def _hf_to_ours(self):
        return tuple((_template_regex(hf), ours, layout) for hf, ours, layout in self.rules)

    @functools.cached_property
    def _ours_to_hf(self):
        return tuple((_template_regex(ours), hf, layout) for hf, ours, layout in self.rules)

    def hub_key_to_path(self, key: str) -> tuple[str, str, int | None] | None:
        """(parameter path, layout, layer index or None if not a stacked layer's) for a HF
        tensor name, or None if the port has no such tensor."""
        for old, new in self.aliases:
            if key.startswith(old):
                key = new + key[len(old):]
        for pattern, template, layout in self._hf_to_ours:
            match = pattern.match(key)
            if match:
                fields = match.groupdict()
                layer = fields.pop("i", None)
                if layer is not None and not layer.isdigit():
                    return None
                return template.format(**fields), layout, None if layer is None else int(layer)
        return None

    def path_to_hub_key(self, path: str, layer: int | None = None) -> tuple[str, str]:
        """(HF tensor name, layout) for a parameter path; `layer` for a stacked one."""
        for pattern, template, layout in self._ours_to_hf:
            match = pattern.match(path)
            if match:
                if ("{i}" in template) != (layer is not None):
                    raise KeyError(f"parameter {path}: a layer index is needed exactly for a "
                                   f"stacked parameter (got {layer})")
                return template.format(**match.groupdict(), i=layer), layout
        raise KeyError(f"no Hugging Face name for parameter {path}")

    def is_stacked(self, path: str) -> bool:
        """Whether a parameter path is a stacked layer's (a leading layer axis)."""
        return any(pattern.match(path) and "{i}" in template
                   for pattern, template, _ in self._ours_to_hf)


QWEN_NAMES = NameTable("Qwen2.5-VL", _RULES, _ALIASES, droppable=("lm_head.weight",))


def hub_key_to_path(key: str) -> tuple[str, str, int | None] | None:
    """(parameter path, layout, layer index or None if not a stacked layer's) for a HF tensor
    name, or None if the port has no such tensor."""
    return QWEN_NAMES.hub_key_to_path(key)


def path_to_hub_key(path: str, layer: int | None = None) -> tuple[str, str]:
    """(HF tensor name, layout) for a parameter path of Qwen25VL; `layer` for a stacked one."""
    return QWEN_NAMES.path_to_hub_key(path, layer)


def is_stacked(path: str) -> bool:
    """Whether a parameter path is a stacked layer's (a leading layer axis)."""
    return QWEN_NAMES.is_stacked(path)


# ---------------------------------------------------------------------------------------------
# safetensors reading and writing
# ---------------------------------------------------------------------------------------------


class SafetensorsFile:
    """A memory-mapped safetensors file; `tensor(name)` returns a NumPy view without copying."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{self.path}: truncated safetensors file (no header); "
                                 "re-download or re-export the checkpoint")
            (header_len,) = pystruct.unpack("<Q", head)
            if 8 + header_len > size:
                raise InputError(f"{self.path}: truncated safetensors file (header runs past the "
                                 "end); re-download or re-export the checkpoint")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise InputError(f"{self.path}: corrupt safetensors header ({e})") from e
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + header_len
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if self.data_start + end > size:
            raise InputError(
                f"{self.path}: truncated safetensors file ({size} bytes, the header promises "
                f"{self.data_start + end}); re-download or re-export the checkpoint"
            )
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise InputError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = self._mmap[self.data_start + begin: self.data_start + end]
        return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata=None) -> None:
    """Write a safetensors file (written to a temporary name, then renamed: never half-written)."""
    header, offset = {}, 0
    for name, array in tensors.items():
        nbytes = array.nbytes
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    path = as_path(path)
    tmp = path.parent / (path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(pystruct.pack("<Q", len(blob)))
        f.write(blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
    tmp.replace(path)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {}
        for name, filename in weight_map.items():
            file = model_dir / filename
            if not file.exists():
                raise InputError(f"{index} lists {filename} for {name}, but {file} is missing; "
                                 "download the complete checkpoint")
            files[name] = file
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return dict.fromkeys(SafetensorsFile(single).keys(), single)
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise InputError(f"{model_dir} holds only pickle weights (.bin/.pt); eureka_jax loads "
                         "safetensors only: convert them with transformers' save_pretrained")
    raise InputError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id downloaded (weights as safetensors only)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{path} is a file; pass the checkpoint directory")
    if str(model).count("/") != 1 or str(model).startswith((".", "/")):
        raise InputError(f"{model}: no such directory (and not a hub id like 'Qwen/Qwen2.5-VL-7B-"
                         "Instruct')")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
    return Path(snapshot_download(str(model), allow_patterns=patterns))


def read_config(model_dir: Path, **runtime) -> Qwen25VLConfig:
    return Qwen25VLConfig.from_hf_dict(read_config_json(model_dir), **runtime)


def read_config_json(model_dir: Path) -> dict:
    """A HF directory's config.json as a dict, with InputErrors that say what is wrong."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.exists():
        raise InputError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{config_file}: not valid JSON ({e})") from e
    return hf_config


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _to_ours(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.reshape(array.shape[0], -1).T
    return array


def _from_ours(array: np.ndarray, layout: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.T.reshape(hf_shape)
    return array


def _flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def load_params(model_dir: Path, abstract_state: nnx.State, shardings=None,
                names: NameTable = QWEN_NAMES) -> nnx.State:
    """Fill an abstract parameter state from a HF directory, tensor by tensor, shard by shard;
    `names` maps the family's HF keys to parameter paths."""
    model_dir = Path(model_dir)
    files = _weight_files(model_dir)
    opened: dict[Path, SafetensorsFile] = {}
    wanted = _flat_params(abstract_state)
    shard_of = _flat_params(shardings) if shardings is not None else {}
    # path -> {layer index (None: not stacked): HF key}
    found: dict[str, dict[int | None, str]] = {}
    layout_of: dict[str, str] = {}
    unexpected = []
    for key in files:
        mapped = names.hub_key_to_path(key)
        if mapped is None or mapped[0] not in wanted or (
                mapped[2] is not None and mapped[2] >= wanted[mapped[0]].shape[0]):
            if key in names.droppable:  # e.g. some tied checkpoints still store lm_head
                continue
            unexpected.append(key)
            continue
        path, layout, layer = mapped
        found.setdefault(path, {})[layer] = key
        layout_of[path] = layout
    if unexpected:
        raise InputError(f"{model_dir}: tensors the {names.family} port does not know: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    missing = []
    for path, variable in sorted(wanted.items()):
        layers = range(variable.shape[0]) if names.is_stacked(path) else [None]
        missing += [names.path_to_hub_key(path, layer)[0] for layer in layers
                    if layer not in found.get(path, {})]
    if missing:
        raise InputError(f"{model_dir}: checkpoint is missing {len(missing)} tensors, e.g. "
                         f"{missing[:5]}")

    def read(key: str) -> np.ndarray:
        file = files[key]
        return opened.setdefault(file, SafetensorsFile(file)).tensor(key)

    def check_shape(key: str, layout: str, ours_shape: tuple[int, ...]) -> None:
        hf_shape = tuple(read(key).shape)
        expected = _from_ours(np.empty(ours_shape, np.bool_), layout, hf_shape).shape if (
            layout != "conv") else (ours_shape[1], math.prod(hf_shape[1:]))
        got = hf_shape if layout != "conv" else (hf_shape[0], math.prod(hf_shape[1:]))
        if tuple(expected) != tuple(got):
            raise InputError(f"{files[key]}: tensor {key} has shape {hf_shape}, the config "
                             f"implies {tuple(expected)}; does config.json belong to these "
                             "weights?")

    def load_one(path: str, variable: nnx.Variable):
        keys, layout = found[path], layout_of[path]
        ours_shape, dtype = tuple(variable.shape), variable.dtype
        stacked = names.is_stacked(path)
        for key in keys.values():
            check_shape(key, layout, ours_shape[1:] if stacked else ours_shape)

        # Only the slice this device holds is read from disk (and transposed): for a stacked
        # parameter, the slice of each of its layers' tensors.
        def fetch(index):
            if not stacked:
                return np.asarray(_to_ours(read(keys[None]), layout)[index], dtype=dtype)
            layers = range(ours_shape[0])[index[0]]
            return np.stack([np.asarray(_to_ours(read(keys[layer]), layout)[index[1:]],
                                        dtype=dtype) for layer in layers])

        target = (shard_of[path].get_value() if path in shard_of
                  else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        return jax.make_array_from_callback(ours_shape, target, fetch)

    flat = nnx.to_flat_state(abstract_state)
    loaded = [(p, var.replace(load_one(".".join(map(str, p)), var))) for p, var in flat]
    return nnx.from_flat_state(loaded)


def load_model(model: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
               rules=sharding.DEFAULT_RULES, **runtime) -> Qwen25VL:
    """A Qwen25VL with weights from a HF directory (or hub id), sharded on `mesh` when given.

    `runtime` sets Qwen25VLConfig's runtime fields: param_dtype, compute_dtype, remat,
    freeze_vision, attention_impl.
    """
    model_dir = resolve_model_dir(model)
    return load_weights(Qwen25VL, read_config(model_dir, **runtime), model_dir, mesh, rules,
                        QWEN_NAMES)


def load_weights(model_class, config, model_dir: Path, mesh: jax.sharding.Mesh | None,
                 rules, names: NameTable):
    """`model_class(config)` with its weights read from `model_dir` under `names`, each device
    reading only its shards of each tensor when `mesh` is given (any family's loader)."""
    abstract = nnx.eval_shape(lambda: model_class(config, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        with sharding.activate(mesh, rules) as context:
            shardings = sharding.state_shardings(abstract_state, context)
    state = load_params(model_dir, abstract_state, shardings, names=names)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def hf_tensors(model: Qwen25VL, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(hub key, host array) pairs, one parameter (of one layer) at a time."""
    v = model.config.vision
    conv = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return param_tensors(model, QWEN_NAMES, conv, dtype)


def param_tensors(model: nnx.Module, names: NameTable, conv_shape: tuple[int, ...],
                  dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(hub key, host array) pairs of a model's parameters under `names`, one parameter (of one
    layer) at a time; `conv_shape` is a "conv" kernel's HF shape after its output dimension."""
    state = nnx.state(model, nnx.Param)
    for path, variable in _flat_params(state).items():
        value = variable[...]
        layers = range(value.shape[0]) if names.is_stacked(path) else [None]
        for layer in layers:
            key, layout = names.path_to_hub_key(path, layer)
            # to_host gathers a parameter sharded over several processes (every process runs
            # this loop: the gather is a collective).
            array = np.asarray(distributed.to_host(value if layer is None else value[layer]))
            if dtype is not None:
                array = array.astype(dtype)
            hf_shape = (array.shape[1], *conv_shape) if layout == "conv" else None
            yield key, np.ascontiguousarray(_from_ours(array, layout, hf_shape))


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def export_model(model: Qwen25VL, output_dir: str | os.PathLike, *,
                 source_dir: str | os.PathLike | None = None, dtype: str | None = None,
                 max_shard_bytes: int = 4 << 30) -> Path:
    """Write a HF directory transformers loads: config.json, safetensors (+ index), tokenizer."""
    np_dtype = None if dtype is None else EXPORT_DTYPES[dtype]
    return write_checkpoint(output_dir, hf_tensors(model, np_dtype), model.config.to_hf_dict(),
                            source_dir=source_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


def write_checkpoint(output_dir: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                     hf_config: dict, *, source_dir: str | os.PathLike | None = None,
                     dtype: str | None = None, max_shard_bytes: int = 4 << 30) -> Path:
    """A HF directory from (key, array) pairs: safetensors shards (+ index), config.json (its
    torch_dtype set to `dtype` when given) and the source directory's tokenizer files. Anywhere
    etils.epath writes (gs:// on a TPU VM). On several processes every one must call this (the
    arrays are gathered as they are read) and process 0 alone writes."""
    output = as_path(output_dir)
    primary = distributed.is_primary()
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, array in tensors:
        if not primary:
            continue
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes
    if not primary:
        return output
    output.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        write_safetensors(output / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(output / name, shard)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(a.nbytes for shard in shards for a in shard.values())
        (output / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = dict(hf_config)
    if dtype is not None:
        config["torch_dtype"] = dtype
    (output / "config.json").write_text(json.dumps(config, indent=2))
    if source_dir is not None:
        copy_tokenizer_files(as_path(source_dir), output)
    return output


def copy_tokenizer_files(source_dir, output) -> None:
    for name in TOKENIZER_FILES:
        source, target = as_path(source_dir) / name, as_path(output) / name
        if source.exists() and os.fspath(source) != os.fspath(target):
            source.copy(target, overwrite=True)


def init_model(config: Qwen25VLConfig, seed: int = 0, mesh=None, rules=sharding.DEFAULT_RULES,
               ) -> Qwen25VL:
    """A randomly initialised model, created directly in its shards when a mesh is given."""
    return init_sharded(Qwen25VL, config, seed, mesh, rules)


def init_sharded(model_class, config, seed: int = 0, mesh=None, rules=sharding.DEFAULT_RULES):
    """`model_class(config)` randomly initialised; with a mesh, created directly in its shards
    (one jitted init whose outputs are the parameter shardings)."""
    if mesh is None:
        return model_class(config, nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: model_class(config, nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    with sharding.activate(mesh, rules) as context:
        shardings = sharding.state_shardings(abstract_state, context)
    state = jax.jit(lambda: nnx.split(model_class(config, nnx.Rngs(seed)))[1],
                    out_shardings=shardings)()
    return nnx.merge(graphdef, state)

