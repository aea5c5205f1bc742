"""`eureka-jax score`: jsonl in, jsonl out, summary, clear errors for malformed input."""

import json

import pytest

from eureka_jax import cli
from eureka_jax.commands import score

GOOD = "<think>because</think><answer>{}</answer>"


def _write(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n"
                              for line in lines))
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_file_end_to_end(tmp_path, capsys):
    records = [
        {"id": "a", "completion": GOOD.format("\\boxed{5}"), "answer": "5", "question": "2+3?"},
        {"id": "b", "completion": GOOD.format("6"), "answer": 5},
        {"id": "c", "completion": "no tags \\boxed{B}", "answer": "B"},
        {"id": "d", "completion": GOOD.format("1"), "answer": "???"},
    ]
    source = _write(tmp_path / "in.jsonl", [json.dumps(r) for r in records] + [""])
    out = tmp_path / "out" / "scored.jsonl"
    assert cli.main(["score", "--input", str(source), "--output", str(out), "--workers", "0"]) == 0
    scored = _records(out)
    assert [r["id"] for r in scored] == ["a", "b", "c", "d"]
    assert scored[0]["question"] == "2+3?"  # input fields are kept
    assert [(r["accuracy"], r["format"], r["reward"]) for r in scored] == [
        (1.0, 1.0, 1.5), (0.0, 1.0, 0.5), (1.0, 0.0, 1.0), (0.0, 1.0, 0.5)]
    assert "'d'" in scored[3]["data_error"]
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["count"] == 4 and summary["data_errors"] == 1 and summary["timeouts"] == 0
    assert summary["mean_reward"] == pytest.approx(3.5 / 4)
    assert "line 4" in summary["data_error_lines"][0]
    assert "data errors 1" in printed


@pytest.mark.parametrize(
    "line,message",
    [('{"completion": "x"', "not valid JSON"),
     ('["completion", "answer"]', "expected a JSON object"),
     ('{"completion": "x"}', "missing field 'answer'"),
     ('{"answer": "1"}', "missing field 'completion'"),
     ('{"completion": 3, "answer": "1"}', "'completion' must be a string"),
     ('{"completion": "x", "answer": "1", "length": "long"}', "'length' must be an integer")],
)
def test_malformed_line_names_its_number(tmp_path, capsys, line, message):
    good = json.dumps({"completion": GOOD.format("1"), "answer": "1"})
    source = _write(tmp_path / "in.jsonl", [good, "", line, good])
    assert score.main(["--input", str(source), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and message in err


def test_invalid_utf8_is_scored_not_fatal(tmp_path, capsys):
    line = b'{"completion": "<answer>5\xff\xfe</answer>", "answer": "5"}\n'
    source = _write(tmp_path / "in.jsonl", [line, json.dumps({"completion": "\\boxed{5}",
                                                               "answer": "5"})])
    assert score.main(["--input", str(source), "--workers", "0"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["count"] == 2 and summary["invalid_utf8_lines"] == 1


def test_config_file_flags_and_user_rewards(tmp_path):
    config = tmp_path / "rewards_config.py"
    config.write_text(
        "def get_config():\n"
        "    return {'rewards': {'format_weight': 0.0, 'overlong': 'truncated',\n"
        "                        'max_length': 100, 'overlong_penalty': 0.25}}\n"
    )
    records = [{"completion": GOOD.format("5"), "answer": "5", "length": 100, "difficulty": 1.0}]
    source = _write(tmp_path / "in.jsonl", [json.dumps(r) for r in records])
    out = tmp_path / "out.jsonl"
    argv = ["--input", str(source), "--output", str(out), "--config", str(config),
            "--workers", "0", "--accuracy-weight", "2", "--user-reward",
            "test_rewards:echo_field=0.5"]
    assert score.main(argv) == 0
    [scored] = _records(out)
    assert scored["reward"] == pytest.approx(2.0 - 0.25 + 0.5)
    assert scored["reward_components"]["overlong"] == -0.25
    assert scored["reward_components"]["test_rewards:echo_field"] == 1.0


def test_overlong_without_lengths_is_an_error(tmp_path, capsys):
    source = _write(tmp_path / "in.jsonl", [json.dumps({"completion": "x", "answer": "1"})])
    argv = ["--input", str(source), "--workers", "0", "--overlong", "truncated",
            "--max-length", "10"]
    assert score.main(argv) == 2
    assert "line 1" in capsys.readouterr().err


def test_missing_input_and_bad_setting(tmp_path, capsys):
    assert score.main(["--input", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    source = _write(tmp_path / "in.jsonl", [json.dumps({"completion": "x", "answer": "1"})])
    assert score.main(["--input", str(source), "--timeout", "-1"]) == 2
    assert "timeout_s" in capsys.readouterr().err


def test_score_with_worker_processes(tmp_path, capsys):
    records = [{"completion": GOOD.format(i), "answer": str(i % 3)} for i in range(12)]
    source = _write(tmp_path / "in.jsonl", [json.dumps(r) for r in records])
    out = tmp_path / "out.jsonl"
    assert score.main(["--input", str(source), "--output", str(out), "--workers", "1"]) == 0
    assert [r["accuracy"] for r in _records(out)] == [float(i < 3) for i in range(12)]
