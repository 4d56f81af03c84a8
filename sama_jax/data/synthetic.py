"""The embedded default dataset: moving coloured shapes, edits with exact ground truth, raw clips.

    sama-make-synthetic --out data/synthetic                 # ~200 samples, a few seconds on a CPU
    sama-make-synthetic --out /tmp/syn --height 128 --width 192 --frames 33 --video-edits 1000

writes real media and three manifests (sama_jax.data.manifest format) under --out:
    video_edits.jsonl   video_edit: videos/<id>_src.mp4 -> videos/<id>_tgt.mp4 + instruction
    image_edits.jsonl   image_edit: images/<id>_src.png -> images/<id>_tgt.png + instruction
    clips.jsonl         t2v:        clips/<id>.mp4 + caption (stage 0 raw clips)

A scene is a background colour and 1-3 objects; each object has a shape, colour, style (filled,
outline, striped), size and a straight-line motion that bounces off the frame edges. An edit changes
exactly one object (recolour, replace shape, remove, add, restyle) and the target is the same scene
rendered with the edit applied, so source and target differ only where the edited object is (before
the lossy H.264 encode; pngs are lossless). Objects in a scene have distinct (colour, shape) pairs so
every instruction names one object. Sample i of each kind is drawn from its own generator seeded
with (seed, kind, i): the data set is a pure function of the arguments, and growing a count keeps
the samples already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from sama_jax import cli
from sama_jax.data import manifest as manifest_lib
from sama_jax.data import video_io

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "black": (15, 15, 20),
    "grey": (110, 110, 115),
    "navy": (20, 25, 70),
    "dark green": (20, 60, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
STYLES = ("filled", "outline", "striped")
EDITS = ("recolour", "replace", "remove", "add", "restyle")
KIND_CODES = {"video_edit": 0, "image_edit": 1, "t2v": 2}
# (colour, shape) pairs of the held-out split only: every colour and every shape is seen in training,
# never in these combinations. A training sample never shows one; a held-out sample always does.
HELD_OUT_PAIRS = frozenset((colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS))


@dataclasses.dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    style: str
    radius: float  # half the object's extent, in pixels
    y: float  # centre at frame 0
    x: float
    vy: float  # pixels per frame
    vx: float

    def describe(self, with_style: bool = False) -> str:
        style = (
            {"filled": "", "outline": "outlined ", "striped": "striped "}[self.style] if with_style else ""
        )
        return f"{style}{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Shape, ...]


def _bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions of a point moving at v that reflects off lo and hi (a triangle wave)."""
    span = hi - lo
    if span <= 0:
        return np.full(t.shape, (lo + hi) / 2)
    q = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


def trajectory(obj: Shape, frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (y, x) of an object over the frames; it stays fully inside the frame."""
    t = np.arange(frames, dtype=np.float64)
    r = obj.radius
    return _bounce(obj.y, obj.vy, t, r, height - 1 - r), _bounce(obj.x, obj.vx, t, r, width - 1 - r)


def _solid(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= r
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if shape == "triangle":  # apex up, base at dy = r; sides through the apex (0, -r) and (+-r, r)
        return (dy <= r) & (2 * np.abs(dx) <= dy + r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _patch(obj: Shape, cy: float, cx: float, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """The object's pixels within its bounding box: (rows, cols, bool mask of that box).

    Only the box is rasterised, so rendering costs the objects' area, not frames x frame size.
    """
    r = obj.radius
    y0, y1 = max(0, int(np.floor(cy - r))), min(height, int(np.ceil(cy + r)) + 1)
    x0, x1 = max(0, int(np.floor(cx - r))), min(width, int(np.ceil(cx + r)) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    solid = _solid(obj.shape, dy, dx, r)
    if obj.style == "filled":
        mask = solid
    elif obj.style in ("outline", "striped"):
        # Outline: the solid minus a shrunken copy; thickness grows with size so it stays visible.
        # Lines and stripes a few pixels wide: the demo's VAE (8x downsampling) can keep them.
        thickness = max(2.5, r / 3)
        mask = solid & ~_solid(obj.shape, dy, dx, r - thickness)
        if obj.style == "striped":  # diagonal stripes inside the outline, in object coordinates
            period = max(5.0, 0.8 * r)
            mask = mask | (solid & (np.mod(np.floor((dy + dx) / period), 2) == 0))
    else:
        raise ValueError(f"unknown style {obj.style!r}; expected one of {STYLES}")
    return slice(y0, y1), slice(x0, x1), mask


def object_mask(obj: Shape, cy: float, cx: float, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the pixels the object paints when centred at (cy, cx)."""
    full = np.zeros((height, width), bool)
    rows, cols, mask = _patch(obj, cy, cx, height, width)
    full[rows, cols] = mask
    return full


def render(scene: Scene, frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8; objects are painted in order, later ones on top."""
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        ys, xs = trajectory(obj, frames, height, width)
        for t in range(frames):
            rows, cols, mask = _patch(obj, ys[t], xs[t], height, width)
            video[t, rows, cols][mask] = COLOURS[obj.colour]
    return video


def object_masks(obj: Shape, frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W) bool: where the object is in every frame (for checking edits)."""
    ys, xs = trajectory(obj, frames, height, width)
    return np.stack([object_mask(obj, ys[t], xs[t], height, width) for t in range(frames)])


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _direction(obj: Shape) -> str:
    if abs(obj.vx) < 0.05 and abs(obj.vy) < 0.05:
        return "stays still"
    if abs(obj.vx) >= abs(obj.vy):
        return "moves to the right" if obj.vx > 0 else "moves to the left"
    return "moves down" if obj.vy > 0 else "moves up"


# Where an added object goes, named in its instruction, as fractions of (height, width): the
# instruction alone fixes the new object (place, size, speed and direction), so the target of an
# "add" edit is learnable from the source and the text, as every other edit's is.
PLACES = {
    "top left": (0.25, 0.25),
    "top": (0.25, 0.5),
    "top right": (0.25, 0.75),
    "left": (0.5, 0.25),
    "centre": (0.5, 0.5),
    "right": (0.5, 0.75),
    "bottom left": (0.75, 0.25),
    "bottom": (0.75, 0.5),
    "bottom right": (0.75, 0.75),
}
MOTIONS = {"right": (0.0, 1.0), "left": (0.0, -1.0), "down": (1.0, 0.0), "up": (-1.0, 0.0)}
ADDED_RADIUS = 0.16  # of min(height, width)
# Object speeds, as fractions of min(height, width) per frame: a moving object's is drawn from
# SPEEDS; an added object (whose speed no instruction names) moves at the middle of that range.
SPEEDS = (0.02, 0.05)
ADDED_SPEED = sum(SPEEDS) / 2
# The fast-motion held-out split (sama-ablate's temporal-consistency cases): every object at least
# twice as fast as the fastest training object.
FAST_SPEEDS = (2 * SPEEDS[1], 3 * SPEEDS[1])


def added_object(
    rng: np.random.Generator, height: int, width: int, taken: set, still: bool, speeds: tuple = SPEEDS
) -> tuple[Shape, str]:
    """(new object, where it goes in words): its (colour, shape) is not in `taken`; place, radius,
    speed and direction are those its words name."""
    free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in taken]
    colour, shape = free[rng.integers(len(free))]
    place = list(PLACES)[rng.integers(len(PLACES))]
    motion = None if still else list(MOTIONS)[rng.integers(len(MOTIONS))]
    size = min(height, width)
    (fy, fx), (dy, dx) = PLACES[place], MOTIONS.get(motion, (0.0, 0.0))
    obj = Shape(
        shape=shape,
        colour=colour,
        style=str(rng.choice(STYLES, p=[0.6, 0.2, 0.2])),
        radius=ADDED_RADIUS * size,
        y=fy * (height - 1),
        x=fx * (width - 1),
        vy=dy * sum(speeds) / 2 * size,
        vx=dx * sum(speeds) / 2 * size,
    )
    return obj, f"at the {place}"


def random_object(
    rng: np.random.Generator, height: int, width: int, taken: set, still: bool, speeds: tuple = SPEEDS
) -> Shape:
    """A new object whose (colour, shape) is not in `taken`, moving at a speed drawn from `speeds`."""
    free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in taken]
    colour, shape = free[rng.integers(len(free))]
    radius = float(rng.uniform(0.12, 0.2) * min(height, width))
    speed = 0.0 if still else float(rng.uniform(*speeds) * min(height, width))
    angle = float(rng.uniform(0, 2 * np.pi))
    return Shape(
        shape=shape,
        colour=colour,
        style=str(rng.choice(STYLES, p=[0.6, 0.2, 0.2])),
        radius=radius,
        y=float(rng.uniform(radius, height - 1 - radius)),
        x=float(rng.uniform(radius, width - 1 - radius)),
        vy=speed * np.sin(angle),
        vx=speed * np.cos(angle),
    )


def random_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    still: bool = False,
    max_objects: int = 3,
    speeds: tuple = SPEEDS,
) -> Scene:
    objects, taken = [], set()
    for _ in range(int(rng.integers(1, max_objects + 1))):
        obj = random_object(rng, height, width, taken, still, speeds)
        taken.add((obj.colour, obj.shape))
        objects.append(obj)
    return Scene(background=str(rng.choice(list(BACKGROUNDS))), objects=tuple(objects))


def _other(rng: np.random.Generator, options, current):
    choices = [o for o in options if o != current]
    return choices[rng.integers(len(choices))]


def random_edit(
    rng: np.random.Generator, scene: Scene, height: int, width: int, still: bool = False, speeds=SPEEDS
) -> tuple[Scene, str, dict]:
    """(edited scene, instruction, edit record). The record names the edit and the object index it
    touches in the source (remove/recolour/replace/restyle) or the target (add)."""
    edit = EDITS[rng.integers(len(EDITS))]
    if edit == "remove" and len(scene.objects) == 1:
        edit = "add"  # keep at least one object in the source and the target
    taken = {(o.colour, o.shape) for o in scene.objects}
    if edit == "add":
        new, where = added_object(rng, height, width, taken, still, speeds)
        target = dataclasses.replace(scene, objects=scene.objects + (new,))
        motion = "" if still else f" that {_direction(new)}"
        text = f"Add {_a(new.describe(with_style=True))} {where}{motion}."
        return target, text, dict(type="add", object=len(scene.objects))
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    others = taken - {(obj.colour, obj.shape)}
    name = obj.describe()
    if edit == "remove":
        objects = scene.objects[:k] + scene.objects[k + 1 :]
        return (
            dataclasses.replace(scene, objects=objects),
            f"Remove the {name}.",
            dict(type="remove", object=k),
        )
    if edit == "recolour":
        colour = _other(rng, [c for c in COLOURS if (c, obj.shape) not in others], obj.colour)
        new, text = dataclasses.replace(obj, colour=colour), f"Change the color of the {name} to {colour}."
    elif edit == "replace":
        shape = _other(rng, [s for s in SHAPES if (obj.colour, s) not in others], obj.shape)
        new = dataclasses.replace(obj, shape=shape)
        text = f"Replace the {name} with {_a(obj.colour + ' ' + shape)}."
    else:  # restyle
        style = _other(rng, STYLES, obj.style)
        new = dataclasses.replace(obj, style=style)
        text = {
            "filled": f"Fill in the {name}.",
            "outline": f"Make the {name} an outline only.",
            "striped": f"Give the {name} diagonal stripes.",
        }[style]
    objects = scene.objects[:k] + (new,) + scene.objects[k + 1 :]
    return dataclasses.replace(scene, objects=objects), text, dict(type=edit, object=k)


def caption(scene: Scene) -> str:
    parts = [f"{_a(o.describe(with_style=True))} {_direction(o)}" for o in scene.objects]
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"On a {scene.background} background, {joined}."


def sample_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, KIND_CODES[kind], index])


def _in_split(held_out: bool | None, *scenes: Scene) -> bool:
    """None: any sample; False: no held-out pair anywhere; True: at least one."""
    if held_out is None:
        return True
    shown = {(o.colour, o.shape) for scene in scenes for o in scene.objects}
    return bool(shown & HELD_OUT_PAIRS) == held_out


def _draw(rng: np.random.Generator, held_out: bool | None, make):
    """make(rng) -> (scenes, result), redrawn from the same generator until the scenes belong to the
    split: a sample stays a pure function of (seed, kind, index, split)."""
    while True:
        scenes, result = make(rng)
        if _in_split(held_out, *scenes):
            return result


def make_video_edit(
    seed: int,
    index: int,
    frames: int,
    height: int,
    width: int,
    held_out: bool | None = None,
    speeds: tuple = SPEEDS,
):
    """(source (T,H,W,3), target, instruction, edit record) for video-edit sample `index`."""

    def make(rng):
        scene = random_scene(rng, height, width, speeds=speeds)
        edited, text, record = random_edit(rng, scene, height, width, speeds=speeds)
        return (scene, edited), (
            render(scene, frames, height, width),
            render(edited, frames, height, width),
            text,
            record,
        )

    return _draw(sample_rng(seed, "video_edit", index), held_out, make)


def make_image_edit(seed: int, index: int, height: int, width: int, held_out: bool | None = None):
    """(source (H,W,3), target, instruction, edit record) for image-edit sample `index`."""

    def make(rng):
        scene = random_scene(rng, height, width, still=True)
        edited, text, record = random_edit(rng, scene, height, width, still=True)
        return (scene, edited), (
            render(scene, 1, height, width)[0],
            render(edited, 1, height, width)[0],
            text,
            record,
        )

    return _draw(sample_rng(seed, "image_edit", index), held_out, make)


def make_clip(seed: int, index: int, frames: int, height: int, width: int, held_out: bool | None = None):
    """(clip (T,H,W,3), caption) for raw clip `index`."""

    def make(rng):
        scene = random_scene(rng, height, width)
        return (scene,), (render(scene, frames, height, width), caption(scene))

    return _draw(sample_rng(seed, "t2v", index), held_out, make)


def generate(
    out: str,
    seed: int = 0,
    video_edits: int = 64,
    image_edits: int = 64,
    clips: int = 64,
    frames: int = 17,
    height: int = 64,
    width: int = 96,
    fps: float = 16.0,
    held_out: bool | None = None,
    speeds: tuple = SPEEDS,
) -> dict:
    """Writes the media and the three manifests under `out`; returns {manifest name: path}.
    speeds: the range of the video edits' object speeds (fractions of min(height, width) per frame).

    held_out: None draws any scene; False (a training split) never shows a HELD_OUT_PAIRS object;
    True (a held-out split) always shows at least one, in the source or the target."""
    if height % 2 or width % 2 or height < 16 or width < 16:
        raise ValueError(f"height and width must be even and >= 16 (H.264 yuv420p), got {height}x{width}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    size = dict(frames=frames, height=height, width=width, fps=fps)
    rows = {"video_edits": [], "image_edits": [], "clips": []}
    for i in range(video_edits):
        sid = f"synvid_{i:06d}"
        source, target, text, record = make_video_edit(seed, i, frames, height, width, held_out, speeds)
        src, tgt = f"videos/{sid}_src.mp4", f"videos/{sid}_tgt.mp4"
        video_io.write_video(os.path.join(out, src), source, fps)
        video_io.write_video(os.path.join(out, tgt), target, fps)
        rows["video_edits"].append(
            dict(
                id=sid,
                kind="video_edit",
                source=src,
                target=tgt,
                text=text,
                edit=record,
                origin="synthetic",
                **size,
            )
        )
    for i in range(image_edits):
        sid = f"synimg_{i:06d}"
        source, target, text, record = make_image_edit(seed, i, height, width, held_out)
        src, tgt = f"images/{sid}_src.png", f"images/{sid}_tgt.png"
        video_io.write_image(os.path.join(out, src), source)
        video_io.write_image(os.path.join(out, tgt), target)
        rows["image_edits"].append(
            dict(
                id=sid,
                kind="image_edit",
                source=src,
                target=tgt,
                text=text,
                edit=record,
                origin="synthetic",
                height=height,
                width=width,
            )
        )
    for i in range(clips):
        sid = f"synclip_{i:06d}"
        clip, text = make_clip(seed, i, frames, height, width, held_out)
        path = f"clips/{sid}.mp4"
        video_io.write_video(os.path.join(out, path), clip, fps)
        rows["clips"].append(dict(id=sid, kind="t2v", target=path, text=text, origin="synthetic", **size))
    paths = {}
    for name, samples in rows.items():
        paths[name] = os.path.join(out, name + ".jsonl")
        manifest_lib.write_manifest(paths[name], samples)
    return paths


# The embedded default of the tiny presets (sama-smoke, sama-train): small enough to make in seconds.
DEFAULT_SIZE = dict(frames=9, height=64, width=64)
DEFAULT_COUNTS = dict(video_edits=32, image_edits=32, clips=32)
VAL_COUNTS = dict(video_edits=20, image_edits=8, clips=8)  # the demo scores the video edits
VAL_SEED = 1  # held out: a generator seed the training split never uses
# sama-demo's training split: enough distinct scenes that the DiT learns the edits, not the samples.
DEMO_COUNTS = dict(video_edits=500, image_edits=500, clips=250)
FAST_SEED = 2  # the fast-motion split's generator seed (no other split uses it)


def ensure_fast_split(out: str, video_edits: int) -> str:
    """The fast-motion held-out split under `out`: video edits only, every object at FAST_SPEEDS, of
    (colour, shape) pairs the training split shows (new scenes from their own seed), so speed is the
    one thing training never saw. Kept when present. Returns its manifest."""
    path = os.path.join(out, "video_edits.jsonl")
    if not os.path.exists(path):  # written last by generate: present means complete
        print(f"generating the fast-motion held-out split in {out}")
        generate(
            out,
            seed=FAST_SEED,
            video_edits=video_edits,
            image_edits=0,
            clips=0,
            **DEFAULT_SIZE,
            held_out=False,
            speeds=FAST_SPEEDS,
        )
    return path


def ensure_dataset(data_dir: str, vocab_size: int, counts: dict | None = None) -> str:
    """The tiny presets' data, made once under data_dir: the training split (seed 0, no
    HELD_OUT_PAIRS object), a held-out split in data_dir/val (seed 1, each sample shows one) and a
    SentencePiece tokenizer trained on the training texts.
    Returns the tokenizer directory. Parts already present are kept."""
    import glob

    from sama_jax import text
    from sama_jax.data import pretext

    if not os.path.exists(os.path.join(data_dir, "video_edits.jsonl")):
        print(f"generating the synthetic dataset in {data_dir}")
        generate(data_dir, seed=0, **(counts or DEFAULT_COUNTS), **DEFAULT_SIZE, held_out=False)
    val_dir = os.path.join(data_dir, "val")
    if not os.path.exists(os.path.join(val_dir, "video_edits.jsonl")):
        print(f"generating the held-out synthetic split in {val_dir}")
        generate(val_dir, seed=VAL_SEED, **VAL_COUNTS, **DEFAULT_SIZE, held_out=True)
    tokenizer_dir = os.path.join(data_dir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        texts = [
            s["text"]
            for path in sorted(glob.glob(os.path.join(data_dir, "*.jsonl")))
            for s in manifest_lib.read_manifest(path)
        ]
        texts += list(pretext.DEFAULT_TOKENS.values()) + ["[Video edit]"]
        text.build_sentencepiece_tokenizer(texts, tokenizer_dir, vocab_size=vocab_size)
    return tokenizer_dir


def main(argv=None) -> int:
    return cli.run("sama-make-synthetic", lambda: _main(argv))


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="sama-make-synthetic",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="data/synthetic", help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video-edits", type=int, default=64, help="paired video edits")
    parser.add_argument("--image-edits", type=int, default=64, help="paired image edits (png)")
    parser.add_argument("--clips", type=int, default=64, help="raw text-to-video clips (stage 0)")
    parser.add_argument("--frames", type=int, default=17, help="frames per video (4k+1 suits Wan)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument(
        "--split",
        default="any",
        choices=("any", "train", "held_out"),
        help="train: never a HELD_OUT_PAIRS (colour, shape) object; held_out: always one",
    )
    args = parser.parse_args(argv)
    paths = generate(
        args.out,
        seed=args.seed,
        video_edits=args.video_edits,
        image_edits=args.image_edits,
        clips=args.clips,
        frames=args.frames,
        height=args.height,
        width=args.width,
        fps=args.fps,
        held_out={"any": None, "train": False, "held_out": True}[args.split],
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
