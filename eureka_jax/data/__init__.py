"""Records, sources (jsonl / parquet / HF datasets directories), the synthetic dataset, the
converter and the grain input pipeline."""

from eureka_jax.data.convert import ConvertReport, convert
from eureka_jax.data.pipeline import BatchIterator, PipelineConfig, make_pipeline
from eureka_jax.data.records import (
    BAD_RECORD_REASONS,
    MMEUREKA_SYSTEM_PROMPT,
    BadRecordError,
    BadRecordPolicy,
    Record,
    load_images,
)
from eureka_jax.data.sources import (
    ArrowDatasetSource,
    JsonlSource,
    ParquetSource,
    RecordSource,
    iter_records,
    load_records,
    open_source,
)
from eureka_jax.data.synthetic import DIFFICULTIES, TASKS, Difficulty, make_synthetic

__all__ = [
    "BAD_RECORD_REASONS", "DIFFICULTIES", "MMEUREKA_SYSTEM_PROMPT", "TASKS", "ArrowDatasetSource",
    "BadRecordError", "BadRecordPolicy", "BatchIterator", "ConvertReport", "Difficulty",
    "JsonlSource", "ParquetSource", "PipelineConfig", "Record", "RecordSource", "convert",
    "iter_records", "load_images", "load_records", "make_pipeline", "make_synthetic", "open_source",
]
