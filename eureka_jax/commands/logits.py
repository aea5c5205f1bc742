"""`eureka-jax logits --model DIR --inputs IN.npz --output OUT.npz [--dtype float32|bfloat16]
[--mesh 1,1,1]`: the Flax port's logits for arrays saved from the Hugging Face processor.

IN.npz holds `input_ids` and `attention_mask` (batch, length), and, when there are images,
`pixel_values` (all images' patch rows, HF order) and `image_grid_thw` (images, 3), e.g.
`np.savez("in.npz", **processor(text=texts, images=images, padding=True, return_tensors="np"))`.
OUT.npz gets `logits` (batch, length, vocab) float32, aligned with the input positions (padding
positions hold meaningless values, as in transformers).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np

from eureka_jax.commands import argument_parser
from eureka_jax.errors import InputError

EXAMPLES = (
    "eureka-jax logits --model hf/qwen2_5_vl_3b --inputs in.npz --output out.npz --dtype "
    "bfloat16 --mesh 1,4,1",
)


def parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--mesh {text!r}: give three positive sizes data,fsdp,tensor like 1,1,1")
    return shape


def read_npz(path: str) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise InputError(f"--inputs {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise InputError(f"--inputs {path}: not a readable .npz of numeric arrays ({e})") from e


def logits_for(model_dir: str, arrays: dict[str, np.ndarray], *, dtype: str = "float32",
               mesh_shape: tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
    """(batch, length, vocab) float32 logits of the port on `mesh_shape` devices."""
    import jax

    from eureka_jax import families, hf_io, sharding, verify

    devices = jax.devices()
    needed = int(np.prod(mesh_shape))
    if needed > len(devices):
        raise InputError(f"--mesh {mesh_shape} needs {needed} devices; {len(devices)} available")
    # Inputs are checked against the config before any weight is read.
    source = hf_io.resolve_model_dir(model_dir)
    family = families.for_model_dir(source)
    config = family.read_config(source)
    batch = family.port_inputs(arrays, config, source="--inputs")
    mesh = sharding.make_mesh(mesh_shape, devices[:needed])
    model = family.load_model(source, mesh=mesh, param_dtype=dtype, compute_dtype=dtype)
    with sharding.activate(mesh):
        return verify.port_logits(model, batch)


def main(argv: list[str]) -> int:
    parser = argument_parser("logits", __doc__, EXAMPLES)
    parser.add_argument("--model", required=True,
                        help="Hugging Face Qwen2.5-VL or InternVL directory")
    parser.add_argument("--inputs", required=True, help="npz of HF processor arrays")
    parser.add_argument("--output", required=True, help="npz to write (key 'logits')")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter and compute dtype of the port")
    parser.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor mesh shape")
    args = parser.parse_args(argv)
    try:
        logits = logits_for(args.model, read_npz(args.inputs), dtype=args.dtype,
                            mesh_shape=parse_mesh(args.mesh))
    except InputError as e:
        print(f"eureka-jax logits: {e}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(output, logits=logits)
    print(f"wrote logits {logits.shape} to {output}")
    return 0
