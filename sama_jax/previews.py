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
