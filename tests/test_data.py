"""fill50k generator geometry and determinism, folder datasets and their errors, metrics, CLI parsing, the fill50k
tokenizer, and inputs that used to fail deep inside (non-UTF-8 index files, 16-bit grey images)."""

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from controlnext import cli
from controlnext.data import (COLORS, VOCAB, Fill50k, FolderDataset, fill50k_example, fill50k_params, fill50k_tokenizer,
                              load_image, parse_prompt, render, validation_example, write_fill50k)
from controlnext.metrics import color_error, fill50k_metrics, fill_iou, palette_error


# --- generator --------------------------------------------------------------------------------------------------------

def test_geometry_at_512():
    for i in range(50):
        p = fill50k_params(i, seed=0)
        assert 96 <= p["cx"] <= 416 and 96 <= p["cy"] <= 416 and 64 <= p["r"] <= 256
        assert COLORS[p["circle"]] != COLORS[p["background"]]
        ex = fill50k_example(i, 512)
        y, x = np.mgrid[:512, :512]
        d = np.hypot(x - p["cx"], y - p["cy"])
        ring = ex["control"][..., 0] == 255
        assert np.array_equal(ring, np.abs(d - p["r"]) <= 2.5)  # 5 px wide band around the circle
        assert np.array_equal(ex["disc"], d <= p["r"])
        assert set(np.unique(ex["control"])) <= {0, 255}  # binary, no anti-aliasing
        # target: disc in the circle colour, the rest in the background colour
        assert (ex["target"][ex["disc"]] == COLORS[p["circle"]]).all()
        assert (ex["target"][~ex["disc"]] == COLORS[p["background"]]).all()


def test_geometry_scales_and_ring_is_connected_at_small_sizes():
    p = fill50k_params(7)
    for size in (64, 40):
        ring, disc = render(p["cx"], p["cy"], p["r"], size)
        s = size / 512
        cx, cy, r = round(p["cx"] * s), round(p["cy"] * s), round(p["r"] * s)
        assert disc[cy, cx] and disc.sum() == pytest.approx(np.pi * r * r, rel=0.25)
        # every pixel within half a pixel of the circle is on the ring (no gaps), and nothing far from it is
        y, x = np.mgrid[:size, :size]
        d = np.abs(np.hypot(x - cx, y - cy) - r)
        assert ring[d <= 0.5].all() and not ring[d > 1.0].any()


def test_deterministic_by_index_and_seed():
    a, b = fill50k_example(3, 64, seed=0), fill50k_example(3, 64, seed=0)
    assert np.array_equal(a["target"], b["target"]) and a["prompt"] == b["prompt"]
    prompts = {fill50k_example(3, 64, seed=s)["prompt"] for s in range(5)}
    assert len(prompts) > 1
    item = Fill50k(64)[3]
    assert item["image"].shape == (3, 64, 64) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["control"].min() == 0 and item["control"].max() == 1


def test_prompts_and_split_table():
    assert len(COLORS) == 141  # CSS named colours without the "grey" duplicates
    for name in ("pale golden rod", "light golden rod yellow", "honey dew", "corn silk", "burly wood", "fire brick",
                 "papaya whip", "cornflower blue", "medium spring green", "dark turquoise", "old lace"):
        assert name in COLORS
    assert parse_prompt("light coral circle with white background") == ("light coral", "white")
    with pytest.raises(ValueError, match="not a fill50k prompt"):
        parse_prompt("a cat")
    assert validation_example(0, 64)["prompt"] == "red circle with blue background"


# --- folders ----------------------------------------------------------------------------------------------------------

def test_write_and_read_controlnet_layout(tmp_path):
    write_fill50k(tmp_path, 3, size=64)
    lines = (tmp_path / "prompt.json").read_text().splitlines()
    assert json.loads(lines[1]) == {"source": "source/1.png", "target": "target/1.png",
                                    "prompt": fill50k_example(1, 64)["prompt"]}
    ds = FolderDataset(tmp_path, 64)
    assert len(ds) == 3
    assert torch.equal(ds[1]["image"], Fill50k(64)[1]["image"])
    assert torch.equal(ds[1]["control"], Fill50k(64)[1]["control"])


def test_imagefolder_layout_grayscale_rgba_and_crop(tmp_path):
    Image.new("L", (80, 48), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (48, 80), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": "rgba.png", "conditioning_image": "gray.png",
                                                         "text": "red"}) + "\n")
    item = FolderDataset(tmp_path, 32)[0]
    assert item["image"].shape == item["control"].shape == (3, 32, 32)
    assert item["prompt"] == "red"
    assert torch.allclose(item["image"][0], torch.ones(32, 32))  # RGBA -> RGB red


def _bad(tmp_path, name):
    """A folder broken in one way; returns the (path, size) to open it with."""
    (tmp_path / "source").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "source" / "0.png")
    row = {"source": "source/0.png", "target": "source/0.png", "prompt": "p"}
    lines = {"empty": "", "missing_file": json.dumps({**row, "target": "target/9.png"}),
             "bad_json": "{not json", "missing_key": json.dumps({"source": "source/0.png"})}
    if name in lines:
        (tmp_path / "prompt.json").write_text(lines[name])
    if name == "unreadable":
        (tmp_path / "source" / "1.png").write_bytes(b"not a png")
        (tmp_path / "prompt.json").write_text(json.dumps({**row, "target": "source/1.png"}))
    return tmp_path


@pytest.mark.parametrize("case, message", [
    ("empty", "empty"), ("missing_file", "image file not found"), ("bad_json", "not a JSON object"),
    ("missing_key", "missing key"), ("no_index", "no index file"),
])
def test_bad_folders_give_one_clear_error(tmp_path, case, message):
    with pytest.raises(ValueError, match=message):
        FolderDataset(_bad(tmp_path, case), 8)


def test_unreadable_image_missing_folder_and_size(tmp_path):
    ds = FolderDataset(_bad(tmp_path, "unreadable"), 8)
    with pytest.raises(ValueError, match="cannot read image"):
        ds[0]
    with pytest.raises(ValueError, match="dataset folder not found"):
        FolderDataset(tmp_path / "nope", 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        Fill50k(60)


# --- metrics ----------------------------------------------------------------------------------------------------------

def test_metrics_perfect_and_inverted():
    ex = fill50k_example(5, 64)
    target = torch.from_numpy(ex["target"]).permute(2, 0, 1)[None].float() / 127.5 - 1
    disc = torch.from_numpy(ex["disc"])[None]
    m = fill50k_metrics(target, disc, [ex["circle_rgb"]], [ex["background_rgb"]])
    assert m["iou"] == 1.0 and m["color_error_in"] < 1e-6 and m["color_error_out"] < 1e-6 and m["palette_error"] < 1e-6
    images = (target + 1) / 2
    assert fill_iou(images, ~disc, [ex["circle_rgb"]], [ex["background_rgb"]]).item() == 0.0
    err_in, _ = color_error(torch.zeros_like(images), disc, [(255, 255, 255)], [(0, 0, 0)])
    assert err_in.item() == pytest.approx(1.0)


def test_fill_iou_partial_overlap_closed_form():
    """IoU = |A & B| / |A | B|, checked where it is neither 1 nor 0 (item 19 of issue 15). The prediction (pixels
    nearer the circle colour) is the left half of an 8x8 image. Against the top half: 16 / 48 = 1/3, where recall,
    precision and a XOR union give 1/2; against the top-left quadrant: 16 / 32 = 1/2, where recall and the XOR union
    give 1. Nothing predicted and nothing to predict counts as a perfect 1."""
    circle, background = [(200, 30, 30)], [(10, 10, 240)]
    image = torch.empty(1, 3, 8, 8)
    image[:] = torch.tensor(background[0]).view(1, 3, 1, 1) / 255
    image[..., :4] = torch.tensor(circle[0]).view(1, 3, 1, 1) / 255 + 0.04  # near the circle colour, not on it
    top, quadrant = torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)
    top[:, :4], quadrant[:, :4, :4] = True, True
    assert fill_iou(image, top, circle, background).item() == pytest.approx(1 / 3, abs=1e-7)
    assert fill_iou(image, quadrant, circle, background).item() == pytest.approx(1 / 2, abs=1e-7)
    plain = torch.tensor(background[0]).view(1, 3, 1, 1).expand(1, 3, 8, 8) / 255
    assert fill_iou(plain, torch.zeros_like(top), circle, background).item() == 1.0


# --- CLI --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Config:
    lr: float = 1e-4
    steps: int = 10
    name: str = "a"
    flag: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    maybe: int | None = None
    files: tuple[str, ...] = ()
    scales: tuple[float, ...] = ()


def test_cli_overrides_and_errors(tmp_path):
    config, dry = cli.parse_args(_Config, ["--lr=1", "--steps", "3", "--name=zero_conv", "--flag", "--betas=(0.5, 0.6)",
                                           "--maybe=None", "--dry_run"])
    assert config == _Config(lr=1.0, steps=3, name="zero_conv", flag=True, betas=(0.5, 0.6)) and dry
    assert isinstance(config.lr, float)
    with pytest.raises(ValueError, match="unknown option --nope"):
        cli.parse_args(_Config, ["--nope=1"])
    with pytest.raises(ValueError, match="expected <class 'int'>"):
        cli.parse_args(_Config, ["--steps=1.5"])
    with pytest.raises(ValueError, match="expected"):
        cli.parse_args(_Config, ["--flag=3"])
    assert cli.from_dict(_Config, cli.to_dict(config)) == config
    with pytest.raises(ValueError, match="experiment file not found"):
        cli.parse_args(_Config, [str(tmp_path / "missing.py")])
    # Variable-length tuples: one item per flag (repeated flags append) or a literal; fixed-length ones only a literal.
    config, _ = cli.parse_args(_Config, ["--files=a.safetensors", "--files", "b.png", "--scales=0.5", "--scales=1"])
    assert config.files == ("a.safetensors", "b.png") and config.scales == (0.5, 1.0)
    assert cli.parse_args(_Config, ["--scales=(0.25, 0.75)"])[0].scales == (0.25, 0.75)
    with pytest.raises(ValueError, match="--betas=0.5"):
        cli.parse_args(_Config, ["--betas=0.5"])


# --- the miniature models' tokenizer --------------------------------------------------------------------------------

def test_fill50k_tokenizer_has_one_token_per_prompt_word_in_the_real_format(tmp_path):
    tokenizer = fill50k_tokenizer()
    assert len(tokenizer.vocab) == 853 and tokenizer.eos_id == 852  # sd_pipeline.MINI_SD15's vocab_size / eos
    for word in VOCAB:
        assert len(tokenizer.encode(word)) == 1, word
    prompt = fill50k_example(3, 8)["prompt"]
    ids = tokenizer([prompt])[0].tolist()
    assert ids[0] == tokenizer.bos_id and ids[len(prompt.split()) + 1] == tokenizer.eos_id
    tokenizer.save(tmp_path)  # vocab.json + merges.txt: transformers' CLIPTokenizer reads the same ids
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert reference(prompt, padding="max_length", max_length=77).input_ids == ids


# --- inputs that used to fail deep inside (issue 15, items 8 and 10) ----------------------------------------------------

@pytest.mark.parametrize("index_file", ["prompt.json", "metadata.jsonl"])
def test_non_utf8_index_files_name_the_file_and_line(tmp_path, index_file):
    write_fill50k(tmp_path, 2, 8)
    (tmp_path / "prompt.json").unlink()
    keys = ("target", "source", "prompt") if index_file == "prompt.json" else ("image", "conditioning_image", "text")
    good = json.dumps(dict(zip(keys, ("target/0.png", "source/0.png", "a")))).encode()
    (tmp_path / index_file).write_bytes(good + b"\n" + good.replace(b'"a"', b'"caf\xe9"') + b"\n")  # Latin-1 byte
    with pytest.raises(ValueError, match=rf"{index_file}:2: not UTF-8"):
        FolderDataset(tmp_path, 8)


def test_sixteen_bit_grey_images_keep_their_values(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    Image.fromarray(ramp).save(tmp_path / "depth.png")  # uint16 -> mode "I;16"
    image = load_image(tmp_path / "depth.png", 8)
    expected = np.round(ramp * (255 / 65535)).astype(np.uint8)  # not PIL's clip to 255
    assert np.array_equal(image[..., 0], expected) and np.array_equal(image[..., 2], expected)
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "int32.tif")  # mode "I"
    with pytest.raises(ValueError, match="32-bit"):
        load_image(tmp_path / "int32.tif", 8)


def test_palette_and_colour_errors_closed_forms():
    """palette error = mean over pixels of sqrt(mean_channels (x - nearer prompt colour)^2); colour errors = mean |x -
    colour| over the disc's (outside's) pixels and channels. Two pixels: one 0.3 off the circle colour in one channel,
    one on the background colour: sqrt(0.09 / 3) / 2, where a square root taken after the pixel mean gives
    sqrt(0.015) and an RMS over channels summed instead of averaged sqrt(0.09) / 2."""
    circle, background = [(0, 0, 0)], [(255, 255, 255)]
    image = torch.tensor([[0.3, 1.0], [0.0, 1.0], [0.0, 1.0]]).view(1, 3, 1, 2)
    torch.testing.assert_close(palette_error(image, circle, background), torch.tensor([math.sqrt(0.03) / 2]),
                               rtol=1e-6, atol=0)
    disc = torch.tensor([[[True, False]]])
    err_in, err_out = color_error(image, disc, circle, background)
    torch.testing.assert_close(err_in, torch.tensor([0.1]), rtol=1e-6, atol=0)  # 0.3 over 3 channels of 1 pixel
    torch.testing.assert_close(err_out, torch.tensor([0.0]), rtol=0, atol=1e-7)
