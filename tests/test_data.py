"""fill50k generator geometry and determinism, folder datasets and their errors, metrics, CLI parsing, toy text encoder."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from controlnext import cli
from controlnext.data import (COLORS, VOCAB, Fill50k, FolderDataset, fill50k_example, fill50k_params, parse_prompt,
                              render, validation_example, write_fill50k)
from controlnext.metrics import color_error, fill50k_metrics, fill_iou
from encoders.toy_text import TOY, ToyTextEncoder


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


# --- CLI --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Config:
    lr: float = 1e-4
    steps: int = 10
    name: str = "a"
    flag: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    maybe: int | None = None


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


# --- toy text encoder ------------------------------------------------------------------------------------------------

def test_toy_text_encoder_knows_every_prompt_word():
    enc = ToyTextEncoder(TOY, VOCAB)
    prompts = [fill50k_example(i, 8)["prompt"] for i in range(200)]
    ids = enc.tokenize(prompts)
    assert not (ids == enc.index["<unk>"]).any()
    assert enc(prompts[:2]).shape == (2, TOY.max_length, TOY.dim)
    assert enc.tokenize(["brown floral xyz"])[0, 3] == enc.index["<unk>"]
