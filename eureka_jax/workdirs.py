"""Paths of run directories, which may live on an object store (gs://bucket/run on a TPU VM).

pathlib reads `gs://bucket/run` as the local relative path `gs:/bucket/run`, and `.absolute()`
makes it `<cwd>/gs:/bucket/run`. etils.epath (what orbax uses) keeps the scheme and reaches the
store through tf.io.gfile or fsspec, so every path derived from a workdir goes through as_path."""

from __future__ import annotations

import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: URIs (gs://, s3://) unchanged, local paths made absolute (orbax needs that).

    epath's own .absolute() would prefix a URI with the working directory, hence the test."""
    path = epath.Path(path)
    return path if is_uri(path) else path.absolute()


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)
