"""Workdirs anywhere orbax can write: gs:// paths stay gs:// and no workdir path goes through
pathlib or open() (which would turn gs://bucket/run into the local directory gs:/bucket/run)."""

import ast
import os
from pathlib import Path

import pytest

from eureka_jax import metrics
from eureka_jax.metrics import MetricsWriter, plot_curves, read_metrics
from eureka_jax.workdirs import as_path

PACKAGE = Path(__file__).resolve().parents[1] / "eureka_jax"
# The modules that build paths from a run's workdir (checkpoints, metrics, TensorBoard, plots,
# the saved config, eval output).
WORKDIR_MODULES = ("workdirs.py", "checkpointing.py", "metrics.py", "train.py", "sft.py",
                   "commands/train.py", "commands/evaluate.py", "commands/export.py")
# Functions of modules that also read local files (a model directory) which write an export.
EXPORT_WRITERS = {"hf_io.py": ("write_safetensors", "write_checkpoint", "copy_tokenizer_files")}
LOCAL_ONLY_CALLS = {"Path", "pathlib.Path", "open", "io.open", "os.makedirs", "os.mkdir",
                    "os.path.join", "os.path.abspath", "os.path.exists", "os.path.isdir"}


def _called_names(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node.lineno, ast.unparse(node.func)


@pytest.mark.parametrize("module", WORKDIR_MODULES)
def test_workdir_modules_make_no_local_only_paths(module):
    source = (PACKAGE / module).read_text()
    local = [(line, name) for line, name in _called_names(ast.parse(source))
             if name in LOCAL_ONLY_CALLS]
    assert not local, f"{module}: use eureka_jax.workdirs.as_path instead of {local}"


@pytest.mark.parametrize("module", sorted(EXPORT_WRITERS))
def test_export_writers_make_no_local_only_paths(module):
    functions = {node.name: node for node in ast.walk(ast.parse((PACKAGE / module).read_text()))
                 if isinstance(node, ast.FunctionDef)}
    for name in EXPORT_WRITERS[module]:
        local = [(line, call) for line, call in _called_names(functions[name])
                 if call in LOCAL_ONLY_CALLS | {"os.replace", "shutil.copy2"}]
        assert not local, f"{module}:{name}: use eureka_jax.workdirs.as_path, not {local}"


def test_gs_paths_keep_their_scheme():
    run = as_path("gs://bucket/runs/x")
    assert os.fspath(run) == "gs://bucket/runs/x"
    assert str(run / "checkpoints" / "10") == "gs://bucket/runs/x/checkpoints/10"
    assert str((run / "checkpoints").parent) == "gs://bucket/runs/x"
    assert (run / "checkpoints" / "10").name == "10"
    assert str(as_path(str(run / "tensorboard"))) == "gs://bucket/runs/x/tensorboard"


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(as_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert as_path(tmp_path) == as_path(str(tmp_path))


def test_metrics_round_trip_in_a_local_workdir(tmp_path):
    workdir = str(tmp_path / "run")  # a string, as from --workdir
    writer = MetricsWriter(workdir, total_steps=2, show_progress=False)
    writer.write(1, {"reward/mean": 0.5, "eval/accuracy": 0.25})
    writer.write(2, {"reward/mean": 0.75})
    writer.write_samples(2, [{"completion": "4"}])
    writer.close()
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
    assert (tmp_path / "run" / "samples.jsonl").read_text().count("\n") == 1
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    png = plot_curves(workdir)
    assert os.fspath(png) == str(tmp_path / "run" / "curves.png")
    assert (tmp_path / "run" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_metrics_on_an_object_store_are_rewritten_not_appended(tmp_path, monkeypatch):
    """gcsfs opens "a" as "w": a resumed run must keep the earlier lines all the same. (A local
    directory stands in for the bucket; the writer is told it is one.)"""
    monkeypatch.setattr(metrics, "is_uri", lambda path: True)
    workdir = tmp_path / "run"
    for step in (1, 2):  # a run, then its resumption
        writer = MetricsWriter(workdir, total_steps=2, initial_step=step - 1, show_progress=False)
        writer.write(step, {"reward/mean": step / 4})
        assert [r["step"] for r in read_metrics(workdir)] == list(range(1, step + 1))
        writer.close()
