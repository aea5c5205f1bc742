"""`eureka-jax sample`: prompt and HF-array inputs, JSON and readable output, bad input."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eureka_jax import hf_io, testing
from eureka_jax.batch import Buckets
from eureka_jax.commands import sample as command
from eureka_jax.families import qwen2_5_vl as qwen
from eureka_jax.processing import QwenVLProcessor
from eureka_jax.processing.qwen_rows import collate_prompts, prompt_row
from eureka_jax.sampler import Sampler, SamplingConfig

QUESTION = "What is 3 + 4?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return testing.make_hf_model_dir(tmp_path_factory.mktemp("sample_cmd_model"),
                                     initializer_range=0.2, seed=3)


@pytest.fixture(scope="module")
def processor(model_dir):
    return QwenVLProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    testing.draw_image(60, 45, seed=1).save(path)
    return path


def run(capsys, *argv):
    code = command.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_builds_the_chat_turn_with_images_first(model_dir, processor, image_path):
    _, _, rows = command.load_prompts(str(model_dir), prompt=QUESTION, images=[str(image_path)],
                                      system="Think first.")
    text = processor.tokenizer.decode(rows[0].input_ids_T.tolist())
    assert text.startswith("<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    assert text.endswith(f"<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert rows[0].num_patches > 0


def test_prompt_json_and_readable_output(model_dir, processor, image_path, capsys):
    argv = ["--model", model_dir, "--prompt", QUESTION, "--image", image_path,
            "--num-samples", 2, "--max-new-tokens", 6, "--top-p", 0.9, "--seed", 3]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(0, 0), (0, 1)]
    for r in records:
        assert 1 <= len(r["tokens"]) <= 6 and len(r["logprobs"]) == len(r["tokens"])
        assert all(lp <= 0 for lp in r["logprobs"])
        assert r["finish_reason"] in ("stop", "length")
        assert (r["finish_reason"] == "stop") == (r["tokens"][-1] in processor.stop_token_ids)
        assert r["text"] == processor.tokenizer.decode(r["tokens"], skip_special_tokens=True)
    assert records[0]["tokens"] != records[1]["tokens"]

    code, out, _ = run(capsys, *argv)  # readable, same seed: the same samples
    assert code == 0
    for r in records:
        header = (f"--- prompt 0 sample {r['sample_index']} ({r['finish_reason']}, "
                  f"{len(r['tokens'])} tokens, log-prob {sum(r['logprobs']):.2f})")
        assert f"{header}\n{r['text']}\n" in out


def test_hf_arrays_input_on_a_mesh(model_dir, processor, image_path, capsys, tmp_path):
    """Right-padded HF arrays (text + image prompt) sampled greedily on a 2-device mesh, with the
    generated-token buffer growing twice, equal greedy samples of the same prompts encoded
    directly, unsharded, with the default four phases."""
    encoded = [processor.encode(question="2+2"),
               processor.encode(question=QUESTION, images=[str(image_path)])]
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **qwen.hf_arrays(encoded, processor.pad_token_id, padding_side="right"))
    code, out, err = run(capsys, "--model", model_dir, "--inputs", inputs, "--greedy",
                         "--max-new-tokens", 5, "--mesh", "1,1,2", "--cache-phases", 2,
                         "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]

    model = hf_io.load_model(model_dir)
    rows = [prompt_row(e, model.config) for e in encoded]
    batch = collate_prompts(rows, Buckets(lengths=(64,), patches=(0, 64)),
                            pad_token_id=processor.pad_token_id)
    config = SamplingConfig(greedy=True, max_new_tokens=5,
                            stop_token_ids=processor.stop_token_ids)
    expected = jax.device_get(Sampler.for_model(model, config)(
        nnx.state(model), jax.tree.map(jnp.asarray, batch), 0))
    assert [r["prompt_index"] for r in records] == [0, 1]
    for r, tokens, length in zip(records, expected.tokens_NxL, expected.lengths_N, strict=True):
        assert r["tokens"] == tokens[:length].tolist()


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "?", "--image", "{tmp}/missing.png"], "missing.png.*not found"),
    (["--prompt", "?", "--image", "{tmp}/broken.png"], "broken.png.*cannot be decoded"),
    (["--inputs", "{tmp}/missing.npz"], "--inputs .*missing.npz: no such file"),
    (["--inputs", "{tmp}/broken.png"], "not a readable .npz"),
    (["--prompt", "?", "--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--prompt", "?", "--mesh", "2,2"], "--mesh '2,2'"),
    (["--prompt", "?", "--cache-phases", "0"], "cache_phases must be >= 1"),
    (["--inputs", "{tmp}/broken.png", "--image", "{tmp}/broken.png"], "go with --prompt"),
])
def test_bad_input_is_reported(model_dir, tmp_path, capsys, extra, message):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    argv = ["--model", model_dir] + [a.format(tmp=tmp_path) for a in extra]
    code, out, err = run(capsys, *argv)
    assert code == 2 and not out
    assert err.startswith("eureka-jax sample: ")
    assert re.search(message, err), err
