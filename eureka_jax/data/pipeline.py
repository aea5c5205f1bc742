"""The host input pipeline (grain): shard -> shuffle -> repeat -> load + preprocess -> batch.

    it = iter(make_pipeline(source, preprocess, PipelineConfig(batch_size=8, seed=0)))
    batch = next(it)                 # list of 8 preprocess(record) results
    state = it.get_state()           # JSON-serialisable; save it with the checkpoint
    it.set_state(state)              # on a fresh iterator of the same pipeline: resumes exactly
    it.skipped                       # {reason: count} of bad records skipped on this process

Each process reads a disjoint, equally long shard of the records (records[i::n] with the remainder
dropped, so every process runs the same number of steps), shuffled afresh every epoch with the
same seed on all processes. Or, with `chunk_share=(chunk, start, stop)`, every process walks the
same order of all records and takes positions [start, stop) of every `chunk` consecutive ones: the
training run's way, so that a rollout holds the same records whatever the number of processes
(eureka_jax/train.py gathers the shares). Records are loaded and preprocessed in `num_threads`
threads (and optionally `num_workers` processes); order stays deterministic either way.

`preprocess(record)` receives the record with its images decoded to RGB PIL images. It may raise
BadRecordError (e.g. for a prompt that is too long); such records follow the same policy as the
source's: raise, or with skip_bad_records skip and count. Batches contain only good examples.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import grain
from absl import flags as absl_flags

from eureka_jax.data.records import BAD_RECORD_REASONS, BadRecordError, Record, load_images
from eureka_jax.data.sources import RecordSource
from eureka_jax.errors import InputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """batch_size: examples per batch on this process (P prompts).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop the last partial batch (and the records that do not divide evenly over
      processes). Keep True for training: every batch then has batch_size examples.
    num_threads: threads decoding images and preprocessing, per process.
    num_workers: extra processes doing the same (grain mp_prefetch); 0 keeps it in-process.
    """

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    drop_remainder: bool = True
    skip_bad_records: bool = False
    num_threads: int = 2
    num_workers: int = 0
    prefetch_buffer_size: int = 16

    def __post_init__(self):
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise InputError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}.")
        if not 0 <= self.seed < 2**32:
            raise InputError(f"seed must be in [0, 2**32), got {self.seed}.")
        if self.num_threads < 0 or self.num_workers < 0:
            raise InputError("num_threads and num_workers must be >= 0.")


def make_pipeline(
    source: RecordSource,
    preprocess: Callable[[Record], Any],
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    chunk_share: tuple[int, int, int] | None = None,
) -> grain.IterDataset:
    """The pipeline for this process (defaults: jax.process_index() / jax.process_count()).
    `chunk_share` replaces the record shards: see the module docstring."""
    if chunk_share is not None:
        process_index, process_count = 0, 1
    if process_index is None or process_count is None:
        import jax  # only here: the pipeline itself runs without accelerators

        process_index, process_count = jax.process_index(), jax.process_count()
    num_records = len(source)
    shard_end = num_records - num_records % process_count if config.drop_remainder else num_records
    dataset = grain.MapDataset.range(num_records)[process_index:shard_end:process_count]
    if len(dataset) == 0:
        raise InputError(
            f"{source.path}: {num_records} records cannot be shared by {process_count} processes."
        )
    finite = config.drop_remainder and config.num_epochs is not None
    if finite and len(dataset) * config.num_epochs < config.batch_size:
        raise InputError(
            f"{source.path}: {len(dataset)} records per process x {config.num_epochs} epochs "
            f"is less than one batch of {config.batch_size}; lower the batch size."
        )
    if config.shuffle:
        dataset = dataset.shuffle(seed=config.seed)
    # repeat() after shuffle: grain reseeds the shuffle per epoch from the element index.
    dataset = dataset.repeat(config.num_epochs)
    if chunk_share is not None:
        dataset = _ShareOfEveryChunk(dataset, *chunk_share)
    dataset = dataset.map(_PrepareExample(source, preprocess, config.skip_bad_records))
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(
            num_threads=config.num_threads,
            prefetch_buffer_size=max(config.prefetch_buffer_size, config.num_threads),
        )
    )
    if config.num_workers > 0:
        # grain's worker processes read absl flags, which only absl.app.run parses; our CLI uses
        # argparse, so take absl's defaults.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.num_workers)
        )
    return _BatchGoodExamples(iter_dataset, config.batch_size, config.drop_remainder)


class _ShareOfEveryChunk(grain.MapDataset):
    """Positions [start, stop) of every `chunk` consecutive elements of the parent."""

    def __init__(self, parent: grain.MapDataset, chunk: int, start: int, stop: int):
        super().__init__(parent)
        if not 0 <= start < stop <= chunk:
            raise ValueError(f"a share [{start}, {stop}) of chunks of {chunk} is empty or "
                             "outside the chunk")
        self._chunk, self._start, self._share = chunk, start, stop - start

    def __len__(self) -> int:
        return len(self._parent) // self._chunk * self._share

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        chunk, offset = divmod(index, self._share)
        return self._parent[chunk * self._chunk + self._start + offset]

    def __str__(self) -> str:
        return f"_ShareOfEveryChunk(chunk={self._chunk}, start={self._start})"


@dataclasses.dataclass(frozen=True)
class _Skipped:
    """Stands in for a skipped bad record so the batching stage (in the main process, where the
    counts must live) can count it."""

    reason: str


class _PrepareExample:
    """index -> preprocess(record with decoded images), or _Skipped. A class so it pickles to
    worker processes."""

    def __init__(self, source: RecordSource, preprocess: Callable[[Record], Any], skip: bool):
        self.source = source
        self.preprocess = preprocess
        self.skip = skip

    def __call__(self, index: int) -> Any:
        try:
            record = self.source[index]
            return self.preprocess(dataclasses.replace(record, images=load_images(record)))
        except BadRecordError as error:
            if not self.skip:
                raise
            log.warning("skipping bad record: %s", error)
            return _Skipped(error.reason)


class _BatchGoodExamples(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder)

    def __str__(self) -> str:
        return f"_BatchGoodExamples(batch_size={self._batch_size})"


class BatchIterator(grain.DatasetIterator):
    """Yields lists of batch_size good examples; counts the skipped bad records by reason. The
    counts are part of the state, so they survive a resume."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._skipped = collections.Counter(dict.fromkeys(BAD_RECORD_REASONS, 0))

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def __next__(self) -> list[Any]:
        batch = []
        while len(batch) < self._batch_size:
            try:
                example = next(self._parent)
            except StopIteration:
                if batch and not self._drop_remainder:
                    return batch
                raise
            if isinstance(example, _Skipped):
                self._skipped[example.reason] += 1
            else:
                batch.append(example)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": dict(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = collections.Counter(state["skipped"])

    def __str__(self) -> str:
        return f"BatchIterator(batch_size={self._batch_size})"
