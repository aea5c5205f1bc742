"""`eureka-jax logits` and `eureka-jax verify-port` (eureka_jax.verify), through main(argv)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eureka_jax import testing, verify
from eureka_jax.commands import logits as logits_command
from eureka_jax.commands import verify_port as verify_port_command
from eureka_jax.errors import InputError
from eureka_jax.families import qwen2_5_vl as qwen
from eureka_jax.hf_io import read_config
from eureka_jax.processing import QwenVLProcessor


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # initializer_range 0.2: see tests/test_model_parity.py for why not the default 0.5.
    return testing.make_hf_model_dir(tmp_path_factory.mktemp("model"), initializer_range=0.2)


@pytest.fixture(scope="module")
def reference(model_dir):
    return qwen.load_reference(model_dir)


def hf_processor_arrays(model_dir, texts, images, padding_side):
    """The transformers processor's own output (Qwen2_5_VLProcessor without its video processor,
    which needs torchvision)."""
    processor = testing.hf_reference_processor(model_dir, padding_side)
    out = processor(text=texts, images=images, padding=True, return_tensors="np")
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


@pytest.fixture(scope="module")
def processor_arrays(model_dir):
    """A padded batch of three from the HF processor: two images, text only, one image."""
    render = QwenVLProcessor.from_pretrained(model_dir).render
    messages = QwenVLProcessor.build_messages
    texts = [render(messages("Compare the pictures.", 2)), render(messages("What is 2 + 2?", 0)),
             render(messages("Describe it.", 1))]
    images = [testing.draw_image(60, 90, 1), testing.draw_image(120, 40, 2),
              testing.draw_image(30, 30, 3)]
    return {side: hf_processor_arrays(model_dir, texts, images, side)
            for side in ("left", "right")}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_command_matches_transformers(model_dir, reference, processor_arrays, tmp_path,
                                             padding_side, capsys):
    arrays = processor_arrays[padding_side]
    inputs, output = tmp_path / "in.npz", tmp_path / "out" / "logits.npz"
    np.savez(inputs, **arrays)
    argv = ["--model", str(model_dir), "--inputs", str(inputs), "--output", str(output)]
    assert logits_command.main(argv) == 0
    assert "wrote logits" in capsys.readouterr().out
    with np.load(output) as npz:
        logits = npz["logits"]
    image_token_id = read_config(model_dir).image_token_id
    expected = qwen.reference_logits(reference, arrays, image_token_id)
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    stats = verify.compare(logits, expected, arrays["attention_mask"])
    assert stats["rel_diff"] <= 1e-5 and stats["greedy_agree"] == 1.0, stats


def test_logits_command_errors(model_dir, processor_arrays, tmp_path, capsys):
    arrays = processor_arrays["left"]

    def run(name, **changes):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{k: v for k, v in {**arrays, **changes}.items() if v is not None})
        code = logits_command.main(["--model", str(model_dir), "--inputs", str(path),
                                    "--output", str(tmp_path / "out.npz")])
        return code, capsys.readouterr().err

    code, err = run("no_ids", input_ids=None)
    assert code == 2 and "missing array 'input_ids'" in err
    code, err = run("no_pixels", pixel_values=None)
    assert code == 2 and "missing array 'pixel_values'" in err
    # The last image dropped: three runs of <|image_pad|> tokens, two images.
    grids = arrays["image_grid_thw"]
    code, err = run("one_image_short", image_grid_thw=grids[:2],
                    pixel_values=arrays["pixel_values"][: grids[:2].prod(axis=1).sum()])
    assert code == 2 and "image features and image tokens do not match" in err and "row 2" in err
    # Images 0 and 1 swapped: every count still adds up, but row 0's first run is too short.
    code, err = run("swapped", image_grid_thw=grids[[1, 0, 2]])
    assert code == 2 and "row 0 image 0 has" in err
    code, err = run("bad_mask", attention_mask=np.full_like(arrays["attention_mask"], 2))
    assert code == 2 and "attention_mask must be 0/1" in err
    code, err = run("big_ids", input_ids=arrays["input_ids"] + 10_000)
    assert code == 2 and "vocab_size" in err

    argv = ["--model", str(model_dir), "--output", str(tmp_path / "out.npz")]
    assert logits_command.main([*argv, "--inputs", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_text("not a zip")
    assert logits_command.main([*argv, "--inputs", str(tmp_path / "junk.npz")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    assert logits_command.main([*argv, "--inputs", str(tmp_path / "no_ids.npz"),
                                "--mesh", "2,2"]) == 2
    assert "three positive sizes" in capsys.readouterr().err


def test_port_inputs_accepts_text_only_and_missing_mask(model_dir):
    config = read_config(model_dir)
    ids = np.array([[5, 6, 7, 8]])
    batch = qwen.port_inputs({"input_ids": ids}, config)
    assert batch.vision is None and batch.attention_mask_BxT.all()
    np.testing.assert_array_equal(batch.positions_3xBxT, np.broadcast_to(np.arange(4), (3, 1, 4)))
    with pytest.raises(InputError, match="row 0 has no tokens"):
        qwen.port_inputs({"input_ids": ids, "attention_mask": np.zeros_like(ids)}, config)
    with pytest.raises(InputError, match="video tokens are not supported"):
        qwen.port_inputs({"input_ids": np.array([[5, config.video_token_id]])}, config)


def test_verify_port_command(model_dir, capsys):
    assert verify_port_command.main(["--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["passed"] is True
    assert set(result["cases"]) == {"text", "one_image", "two_images", "left_padded_batch"}
    for case in result["cases"].values():
        assert case["rel_diff"] <= 1e-5 and case["greedy_agree"] == 1.0
    assert "rel_diff" in out.splitlines()[0]  # the table's header

    # Nothing is that exact: exit code 1 and passed false (programs are cached: no recompiling).
    assert verify_port_command.main(["--model", str(model_dir), "--tolerance", "1e-12"]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["passed"] is False

    assert verify_port_command.main(["--model", str(model_dir / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
