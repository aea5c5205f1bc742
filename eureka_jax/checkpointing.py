"""Orbax checkpoints of everything a run needs to continue exactly where it stopped.

Each step directory holds the device state (parameters, optimizer state) as an orbax PyTree and
the host state (step, data-iterator state, the online filter's pending groups, counters) as JSON.
Orbax writes into a temporary directory and renames it when complete, so a run killed at any
moment (SIGKILL included) resumes from the last complete checkpoint. SIGTERM (preemptible TPU VMs)
sets a flag that the loop checks after each step: it saves, then exits.
"""

from __future__ import annotations

import base64
import io
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from eureka_jax.workdirs import as_path


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int,
                 async_save: bool = True):
        self.directory = as_path(directory)
        self.every_steps = every_steps
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        )
        self.preempted = False
        self._previous_handler = None

    def install_sigterm_handler(self) -> None:
        def on_sigterm(signum, frame):
            self.preempted = True

        self._previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.preempted or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, step: int, device_state: Any, host_state: dict[str, Any]) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            device=ocp.args.StandardSave(device_state),
            host=ocp.args.JsonSave(host_state),
        ), force=True)

    def restore(self, step: int, abstract_device_state: Any) -> tuple[Any, dict[str, Any]]:
        """`abstract_device_state`: jax.ShapeDtypeStruct leaves carrying the target shardings."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            device=ocp.args.StandardRestore(abstract_device_state),
            host=ocp.args.JsonRestore(),
        ))
        return restored["device"], restored["host"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a live pytree (the restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """NumPy arrays -> the bytes of one .npz (no pickles)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def arrays_of_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def pack_arrays(arrays: dict[str, np.ndarray]) -> str:
    """NumPy arrays -> one base64 string for a JSON checkpoint item (no pickles)."""
    return base64.b64encode(npz_bytes(arrays)).decode("ascii")


def unpack_arrays(packed: str) -> dict[str, np.ndarray]:
    return arrays_of_npz(base64.b64decode(packed))
