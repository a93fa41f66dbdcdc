"""Datasets: procedural fill50k (deterministic by index and seed, any resolution) and image/control/prompt folders.

fill50k is ControlNet's toy control task (Zhang et al. 2023, Fig. 21; the ControlNeXt SD1.5 training README) as
defined in ../shared/reference/fill50k.md: a white ring on black is the control, a disc of the circle colour on the
background colour is the target, the prompt names both colours. Its generator was never published; this one follows
the measured geometry (centre U[96, 416]^2, radius U[64, 256], integers, at 512 px; both scaled with the size).
Ring: pixels whose centre lies within `ring_width / 2` of the circle (5 px wide at 512 px as measured from OpenCV's
thickness-3 LINE_8 outline), never thinner than sqrt(2) px so it stays 8-connected at small sizes. Disc: distance <= r.
Folders: ControlNet's layout (prompt.json lines {"source", "target", "prompt"}) and the Hugging Face imagefolder layout
(metadata.jsonl lines {"image", "conditioning_image", "text"}, the columns of the public fill50k mirror).
Ranges as the trainers use them (controlnext.md §4.1): target in [-1, 1], control in [0, 1].
Write fill50k to disk: `python -m controlnext.data --out data/fill50k --count 50000 --size 512`.
Left out: random crops/flips (the official SD1.5 trainer has none), video clips (a later issue), cv2 rasterisation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, UnidentifiedImageError
from torch.utils.data import Dataset

from encoders.tokenizer import CLIPTokenizer, learn_bpe

# --- colours and prompts ---------------------------------------------------------------------------------------------

# The CSS named colours with their words split the way the fill50k prompts write them (observed: "pale golden rod",
# "light golden rod yellow", "honey dew", "corn silk", "burly wood", "fire brick", "papaya whip", "cornflower blue").
# This is the split table; the key of each entry is the CSS token (the words joined), its RGB comes from PIL.
COLOR_WORDS = (
    "alice blue|antique white|aqua|aquamarine|azure|beige|bisque|black|blanched almond|blue|blue violet|brown|"
    "burly wood|cadet blue|chartreuse|chocolate|coral|cornflower blue|corn silk|crimson|cyan|dark blue|dark cyan|"
    "dark golden rod|dark gray|dark green|dark khaki|dark magenta|dark olive green|dark orange|dark orchid|dark red|"
    "dark salmon|dark sea green|dark slate blue|dark slate gray|dark turquoise|dark violet|deep pink|deep sky blue|"
    "dim gray|dodger blue|fire brick|floral white|forest green|fuchsia|gainsboro|ghost white|gold|golden rod|gray|"
    "green|green yellow|honey dew|hot pink|indian red|indigo|ivory|khaki|lavender|lavender blush|lawn green|"
    "lemon chiffon|light blue|light coral|light cyan|light golden rod yellow|light gray|light green|light pink|"
    "light salmon|light sea green|light sky blue|light slate gray|light steel blue|light yellow|lime|lime green|linen|"
    "magenta|maroon|medium aqua marine|medium blue|medium orchid|medium purple|medium sea green|medium slate blue|"
    "medium spring green|medium turquoise|medium violet red|midnight blue|mint cream|misty rose|moccasin|navajo white|"
    "navy|old lace|olive|olive drab|orange|orange red|orchid|pale golden rod|pale green|pale turquoise|"
    "pale violet red|papaya whip|peach puff|peru|pink|plum|powder blue|purple|rebecca purple|red|rosy brown|"
    "royal blue|saddle brown|salmon|sandy brown|sea green|sea shell|sienna|silver|sky blue|slate blue|slate gray|snow|"
    "spring green|steel blue|tan|teal|thistle|tomato|turquoise|violet|wheat|white|white smoke|yellow|yellow green"
).split("|")
COLORS: dict[str, tuple[int, int, int]] = {
    words: ImageColor.getrgb(words.replace(" ", "")) for words in COLOR_WORDS}  # prompt words -> RGB
PROMPT_TEMPLATE = "{circle} circle with {background} background"  # fill50k.md "Prompt"
# Every word of the fill50k prompts: the vocabulary of fill50k_tokenizer below.
VOCAB = tuple(sorted({w for name in COLOR_WORDS for w in name.split()} | {"circle", "with", "background"}))



def fill50k_tokenizer() -> CLIPTokenizer:
    """The miniature models' CLIP tokenizer: byte-level BPE learned on the fill50k prompt words until every word is one
    token (339 merges, 853 ids, eos = 852), in the real vocab.json + merges.txt format (encoders/tokenizer.py)."""
    return learn_bpe(list(VOCAB), num_merges=10_000)


# Geometry at 512 px (fill50k.md "Geometry"); everything scales with size / 512.
CENTER_RANGE = (96, 416)  # centre coordinate, uniform integer, each axis
RADIUS_RANGE = (64, 256)  # radius, uniform integer
RING_WIDTH = 5.0  # radial width of the control ring at 512 px (OpenCV thickness 3, LINE_8, as measured)
MIN_RING_WIDTH = 2**0.5  # a band at least sqrt(2) px wide keeps the rasterised ring 8-connected

# The two validation pairs every fill50k project uses (fill50k.md "Conventions"), at 512 px: (cx, cy, r, prompt).
VALIDATION_PAIRS = ((160, 257, 198, "red circle with blue background"),
                    (211, 278, 67, "cyan circle with brown floral background"))


def parse_prompt(prompt: str) -> tuple[str, str]:
    """'{circle} circle with {background} background' -> (circle colour words, background colour words)."""
    head, sep, tail = prompt.partition(" circle with ")
    if not sep or not tail.endswith(" background"):
        raise ValueError(f"not a fill50k prompt: {prompt!r}")
    return head, tail[: -len(" background")]


# --- the procedural generator ----------------------------------------------------------------------------------------

def fill50k_params(index: int, seed: int = 0) -> dict:
    """The random choices of example `index` at 512 px: colours (distinct RGB), centre and radius. Pure in (index, seed)."""
    rng = np.random.default_rng([seed, index])  # one independent stream per (seed, index)
    names = list(COLORS)
    circle = names[rng.integers(len(names))]
    others = [n for n in names if COLORS[n] != COLORS[circle]]  # aqua == cyan, fuchsia == magenta: never both
    background = others[rng.integers(len(others))]
    cx, cy = (int(v) for v in rng.integers(CENTER_RANGE[0], CENTER_RANGE[1] + 1, size=2))
    r = int(rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1))
    return {"circle": circle, "background": background, "cx": cx, "cy": cy, "r": r,
            "prompt": PROMPT_TEMPLATE.format(circle=circle, background=background)}


def render(cx: float, cy: float, r: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ring and disc masks (size, size) bool for a circle given at 512 px, scaled to `size` and rounded to pixels."""
    s = size / 512
    cx, cy, r = round(cx * s), round(cy * s), max(1, round(r * s))  # integer centre and radius at every size
    y, x = np.mgrid[:size, :size]
    dist = np.hypot(x - cx, y - cy)  # (size, size) distance of each pixel centre from the circle centre
    half = max(RING_WIDTH * s, MIN_RING_WIDTH) / 2
    return np.abs(dist - r) <= half, dist <= r


def fill50k_example(index: int, size: int = 512, seed: int = 0) -> dict:
    """One example as uint8 arrays: control (ring), target (disc), the disc mask, prompt and both colours' RGB."""
    p = fill50k_params(index, seed)
    ring, disc = render(p["cx"], p["cy"], p["r"], size)
    return make_example(ring, disc, p["prompt"])


def make_example(ring: np.ndarray, disc: np.ndarray, prompt: str) -> dict:
    """Control and target images (H, W, 3) uint8 from masks and a fill50k prompt."""
    circle, background = (COLORS[name] for name in parse_prompt(prompt))
    control = np.repeat(ring[..., None], 3, axis=2).astype(np.uint8) * 255  # white ring on black
    target = np.where(disc[..., None], np.array(circle, np.uint8), np.array(background, np.uint8))
    return {"control": control, "target": target, "disc": disc, "prompt": prompt,
            "circle_rgb": circle, "background_rgb": background}


def validation_example(k: int, size: int) -> dict:
    """Validation pair k (0 or 1, fill50k.md); colour words not in the table ("brown floral") fall back to the nearest
    known name for the metric colours: "brown floral" is out of distribution by design."""
    cx, cy, r, prompt = VALIDATION_PAIRS[k]
    ring, disc = render(cx, cy, r, size)
    circle, background = parse_prompt(prompt)
    background = background if background in COLORS else background.split()[0]
    example = make_example(ring, disc, PROMPT_TEMPLATE.format(circle=circle, background=background))
    example["prompt"] = prompt
    return example


def to_tensors(example: dict) -> dict:
    """uint8 arrays -> the trainers' tensors: image (3, H, W) in [-1, 1], control (3, H, W) in [0, 1], prompt."""
    image = torch.from_numpy(example["target"]).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
    control = torch.from_numpy(example["control"]).permute(2, 0, 1).float() / 255  # (3, H, W)
    return {"image": image, "control": control, "prompt": example["prompt"]}


class Fill50k(Dataset):
    """Procedural fill50k: `length` examples at `size` px, generated on the fly, identical for the same (index, seed)."""

    def __init__(self, size: int = 512, length: int = 50_000, seed: int = 0):
        check_size(size)
        self.size, self.length, self.seed = size, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return to_tensors(fill50k_example(index, self.size, self.seed))


def write_fill50k(out: str | Path, count: int, size: int = 512, seed: int = 0) -> None:
    """Write examples 0..count-1 in ControlNet's layout: prompt.json + source/{i}.png + target/{i}.png."""
    out = Path(out)
    (out / "source").mkdir(parents=True, exist_ok=True)
    (out / "target").mkdir(parents=True, exist_ok=True)
    with open(out / "prompt.json", "w") as f:
        for i in range(count):
            ex = fill50k_example(i, size, seed)
            Image.fromarray(ex["control"]).save(out / "source" / f"{i}.png")
            Image.fromarray(ex["target"]).save(out / "target" / f"{i}.png")
            f.write(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": ex["prompt"]}) + "\n")


# --- folders on disk -------------------------------------------------------------------------------------------------

# Index files we understand, and the (target, control, prompt) keys of their lines.
LAYOUTS = {"prompt.json": ("target", "source", "prompt"),  # ControlNet (lllyasviel/ControlNet tutorial_dataset.py)
           "metadata.jsonl": ("image", "conditioning_image", "text")}  # Hugging Face imagefolder (fusing/fill50k)


def check_size(size: int) -> None:
    if size <= 0 or size % 8:
        raise ValueError(f"resolution must be a positive multiple of 8 (the latent stride), got {size}")


def to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB from any PIL mode: grey/RGBA/palette convert as PIL does; 16-bit grey (I;16*, e.g. depth maps) is
    scaled by 255/65535 (PIL's own RGB conversion clips it to white); 32-bit int/float grey is ambiguous: refused."""
    if im.mode.startswith("I;16"):
        grey = (np.asarray(im, dtype=np.float64) * (255 / 65535)).round().astype(np.uint8)  # (H, W)
        return Image.fromarray(grey).convert("RGB")
    if im.mode in ("I", "F"):
        raise ValueError(f"{path}: a {im.mode!r} (32-bit) image has no fixed value range; save it as 8- or 16-bit")
    return im.convert("RGB")


def load_image(path: Path, size: int | tuple[int, int]) -> np.ndarray:
    """Any PIL-readable image -> (H, W, 3) uint8 at `size` (an int: square; or (height, width)): RGB (grey/RGBA/
    palette/16-bit grey converted), resized to cover the size (bilinear), centre-cropped (controlnext.md §4.1)."""
    height, width = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(path) as im:
            im.load()
            im = to_rgb(im, path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    w, h = im.size
    scale = max(width / w, height / h)
    im = im.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BILINEAR)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return np.array(im.crop((left, top, left + width, top + height)))  # a writable copy


class FolderDataset(Dataset):
    """Target/control/prompt triples from a folder with prompt.json (ControlNet) or metadata.jsonl (imagefolder)."""

    def __init__(self, root: str | Path, size: int = 512):
        check_size(size)
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise ValueError(f"dataset folder not found: {self.root}")
        found = [name for name in LAYOUTS if (self.root / name).is_file()]
        if not found:
            raise ValueError(f"{self.root}: no index file; expected one of {', '.join(LAYOUTS)}")
        index_file = self.root / found[0]
        target_key, control_key, prompt_key = LAYOUTS[found[0]]
        self.items = []
        for n, raw in enumerate(index_file.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{index_file}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{index_file}:{n}: not a JSON object ({e})") from None
            missing = [k for k in (target_key, control_key, prompt_key) if k not in row]
            if missing:
                raise ValueError(f"{index_file}:{n}: missing key(s) {missing}; expected {target_key!r}, "
                                 f"{control_key!r}, {prompt_key!r}")
            target, control = self.root / row[target_key], self.root / row[control_key]
            for path in (target, control):
                if not path.is_file():
                    raise ValueError(f"{index_file}:{n}: image file not found: {path}")
            self.items.append((target, control, str(row[prompt_key])))
        if not self.items:
            raise ValueError(f"{index_file}: the dataset is empty")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        target, control, prompt = self.items[index]
        return to_tensors({"target": load_image(target, self.size), "control": load_image(control, self.size),
                           "prompt": prompt})


def main() -> None:
    parser = argparse.ArgumentParser(description="write procedural fill50k in ControlNet's layout")
    parser.add_argument("--out", required=True, help="output folder (gets prompt.json, source/, target/)")
    parser.add_argument("--count", type=int, default=50_000, help="number of examples")
    parser.add_argument("--size", type=int, default=512, help="resolution in pixels (multiple of 8)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    args = parser.parse_args()
    check_size(args.size)
    write_fill50k(args.out, args.count, args.size, args.seed)
    print(f"wrote {args.count} examples at {args.size} px to {args.out}")


if __name__ == "__main__":
    main()
