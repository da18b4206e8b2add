"""Instance data: 16-bit photos, malformed metadata lines and caption templates are named errors, not tracebacks."""

import json

import numpy as np
import PIL.Image
import pytest

from diffusers_infusion.training import TrainingDataError, load_instance_data


def photos(tmp_path, n=2):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    gray8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0 .. 252
    for bits, folder in ((8, tmp_path / "eight"), (16, tmp_path / "sixteen")):
        folder.mkdir()
        pixels = gray8 if bits == 8 else gray8.astype(np.uint16) * 257  # the same image at 16 bits
        PIL.Image.fromarray(pixels).save(folder / "0.png")
        (folder / "mask").mkdir()
        PIL.Image.fromarray(pixels).save(folder / "mask" / "0.png")
    assert PIL.Image.open(tmp_path / "sixteen" / "0.png").mode.startswith("I;16")
    eight, sixteen = (
        load_instance_data(tmp_path / f, "cat", resolution=8, mask_dir=tmp_path / f / "mask")
        for f in ("eight", "sixteen")
    )
    assert np.array_equal(eight.pixels.numpy(), sixteen.pixels.numpy())
    assert np.array_equal(eight.masks.numpy(), sixteen.masks.numpy())
    assert sixteen.pixels.min() == -1 and sixteen.pixels.max() < 0.98  # not clipped to near-white


def test_32_bit_images_are_refused(tmp_path):
    folder = photos(tmp_path, 1)
    PIL.Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(folder / "1.tif")
    (folder / "1.tif").rename(folder / "1.png")  # a TIFF with a .png name: Pillow reads it by content
    with pytest.raises(TrainingDataError, match=r"image '.*1.png' has 32-bit integer pixels"):
        load_instance_data(folder, "cat", resolution=8)


@pytest.mark.parametrize(
    "line, match",
    [
        ("[1, 2]", r"line 2 of .* is '\[1, 2\]', not a JSON object with 'file_name' and 'text'"),
        ('"a photo of a cat"', r"line 2 of .* is '\"a photo of a cat\"', not a JSON object"),
        ('{"file_name": "1.png", "text": 5}', r"line 2 of .* has caption 5 for '1.png': 'text' must be a non-empty"),
        ('{"file_name": "1.png", "text": ["a cat"]}', r"line 2 of .* has caption \['a cat'\]"),
        ('{"file_name": 1, "text": "a cat"}', r"line 2 of .* not a JSON object with 'file_name'"),
        ('{"file_name": "1.png"', r"line 2 of .* is not valid JSON"),
        (b'{"file_name": "1.png", "text": "a \xff cat"}', r"line 2 of .* is not UTF-8 text"),
    ],
)
def test_malformed_metadata_lines_are_named(tmp_path, line, match):
    folder = photos(tmp_path)
    good = json.dumps({"file_name": "0.png", "text": "a photo of a cat"}).encode()
    (folder / "metadata.jsonl").write_bytes(good + b"\n" + (line if isinstance(line, bytes) else line.encode()))
    with pytest.raises(TrainingDataError, match=match):
        load_instance_data(folder, "cat", resolution=8)


@pytest.mark.parametrize("template", ["a photo of a {cls}", "a photo of a {", "a photo of a {0}", "{class_word.x}"])
@pytest.mark.parametrize("flag", ["--caption_templates", "--instance_prompt"])
def test_broken_caption_templates_are_named(tmp_path, template, flag):
    folder = photos(tmp_path)
    kwargs = (
        {"templates": ("a {class_word}", template)} if flag == "--caption_templates" else {"instance_prompt": template}
    )
    with pytest.raises(TrainingDataError, match=f"{flag}: template '.*' cannot be filled.*doubled"):
        load_instance_data(folder, "cat", resolution=8, **kwargs)


def test_good_templates_and_escaped_braces_work(tmp_path):
    data = load_instance_data(photos(tmp_path), "cat", resolution=8, templates=("a {class_word} {{sic}}",))
    assert data.captions == [["a cat {sic}"]] * 2 and data.sources == ["--caption_templates"] * 2
