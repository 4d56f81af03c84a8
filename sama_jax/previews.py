"""Contact sheets: videos as rows of evenly spaced frames, for people to look at (sama-edit's and
sama-export's previews, the edit samples sama-train writes to TensorBoard).

    sheet = previews.contact_sheet([source, edited, target], columns=8, height=96)   # (H, W, 3) uint8
"""

from __future__ import annotations

import numpy as np

from sama_jax import scores


def contact_sheet(rows: list[np.ndarray], columns: int = 8, height: int = 96) -> np.ndarray:
    """One row of up to `columns` evenly spaced frames per (T, H, W, 3) uint8 video, every video
    scaled to the first one's aspect at `height` px tall (or its own height when smaller)."""
    count = min(len(v) for v in rows)
    idx = np.unique(np.round(np.linspace(0, count - 1, min(columns, count))).astype(int))
    h, w = rows[0].shape[1:3]
    th = min(height, h)
    tw = max(1, round(w * th / h))
    sheet = np.zeros((len(rows) * th, len(idx) * tw, 3), np.uint8)
    for r, video in enumerate(rows):
        thumbs = scores.resize_frames(np.asarray(video)[idx], th, tw)
        for c in range(len(idx)):
            sheet[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = thumbs[c]
    return sheet


def _text_strip(text: str, width: int, height: int, x0: int = 4) -> np.ndarray:
    """A white (height, width, 3) strip with `text` in black, left-aligned at x0."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(image).text((x0, 2), text, fill=(0, 0, 0), font=ImageFont.load_default(height - 6))
    return np.asarray(image)


def labelled_sheet(
    rows: list[tuple[str, list[np.ndarray]]],
    labels: list[str],
    frames: int = 3,
    scale: int = 2,
    gap: int = 6,
    text_height: int = 18,
) -> np.ndarray:
    """A labelled grid for people: a header with one label per column, then per row its caption
    (e.g. the instruction) above `frames` evenly spaced frames of each column's video, frames
    enlarged `scale` times (pixel-exact). rows: [(caption, [(T, H, W, 3) uint8 per column])]."""
    h, w = rows[0][1][0].shape[1:3]
    cell = frames * w * scale
    width = len(labels) * cell + (len(labels) - 1) * gap
    blank = lambda n: np.full((n, width, 3), 255, np.uint8)
    # Each label spans its column and the gap after it, so the header is as wide as the grid.
    header = np.concatenate(
        [
            _text_strip(label, cell + (gap if i < len(labels) - 1 else 0), text_height)
            for i, label in enumerate(labels)
        ],
        axis=1,
    )
    parts = [header]
    for caption, videos in rows:
        parts += [blank(gap), _text_strip(caption, width, text_height)]
        line = []
        for i, video in enumerate(videos):
            video = np.asarray(video)
            picks = np.round(np.linspace(0, len(video) - 1, frames)).astype(int)
            strip = np.concatenate([video[t, :h, :w] for t in picks], axis=1)
            line.append(np.repeat(np.repeat(strip, scale, axis=0), scale, axis=1))
            if i < len(videos) - 1:
                line.append(np.full((h * scale, gap, 3), 255, np.uint8))
        parts.append(np.concatenate(line, axis=1))
    return np.concatenate(parts, axis=0)
