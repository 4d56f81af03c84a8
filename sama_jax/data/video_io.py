"""Media IO: decode (PyAV) and write (ffmpeg, H.264 mp4) videos, and images (Pillow), as uint8 RGB.

    frames = decode_video("clip.mp4", max_frames=81)      # (T, H, W, 3) uint8
    image = decode_image(png_bytes)                      # (H, W, 3) uint8
    media = decode_media(blob, ".png")                   # (1, H, W, 3): images are 1-frame videos
    info = video_info("clip.mp4")                        # {"frames", "fps", "height", "width"}
    size = check_media_file("clip.mp4")                  # bytes; MediaError if missing or empty
    write_video("out.mp4", frames, fps=16)               # H.264 yuv420p; height and width even
    write_image("out.png", frame)

Every input is a path or the encoded bytes (bytes, bytearray, memoryview), so the same calls decode
files on disk and records read back from ArrayRecord shards. Anything that cannot be read - missing,
empty, corrupt or truncated - raises MediaError whose message names the file (or "<bytes>") and the
problem, never an exception of another kind: the data pipeline skips and counts exactly these.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
from fractions import Fraction
from typing import Union

import av
import imageio_ffmpeg
import numpy as np
from PIL import Image, UnidentifiedImageError

MediaInput = Union[str, os.PathLike, bytes, bytearray, memoryview]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")


class MediaError(ValueError):
    """Media that cannot be read or written; the message names the file (or "<bytes>") and the problem.

    `reason` sorts failures for skip counts: missing | empty | truncated | corrupt | unsupported |
    invalid (bad arguments to a writer).
    """

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason across processes (grain workers pickle exceptions)
        return type(self), (str(self), self.reason)


def _name(source: MediaInput) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)


def check_media_file(path: str | os.PathLike) -> int:
    """The size in bytes of a media file; MediaError (reason missing | empty) when there is nothing to read.

    The one existence check of the data path: the decoders and the pipeline's metadata pass start
    with it, so a missing or empty file gets the same message and reason wherever it is found.
    """
    name = os.fspath(path)
    # One stat call: every process runs this for every sample of the global batch, and on network
    # file systems each call is a round trip.
    try:
        info = os.stat(name)
    except (FileNotFoundError, NotADirectoryError):
        raise MediaError(f"{name}: file does not exist", "missing") from None
    except OSError as e:  # permission denied, broken mount...
        raise MediaError(f"{name}: cannot be read ({e.strerror or e})", "missing") from e
    if stat.S_ISDIR(info.st_mode):
        raise MediaError(f"{name}: is a directory, not a media file", "missing")
    if info.st_size == 0:
        raise MediaError(f"{name}: empty file (0 bytes)", "empty")
    return info.st_size


def _open_input(source: MediaInput):
    """A path or a file object over the bytes; raises MediaError for a missing or empty input."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError(f"{_name(source)}: empty input (0 bytes)", "empty")
        return io.BytesIO(bytes(source))
    check_media_file(source)
    return os.fspath(source)


def normalize_ext(ext: str) -> str:
    """'.MP4', 'mp4' -> '.mp4'."""
    ext = ext.lower()
    return ext if ext.startswith(".") else "." + ext


def is_image_ext(ext: str) -> bool:
    return normalize_ext(ext) in IMAGE_EXTS


def _video_stream(container, name: str):
    if not container.streams.video:
        raise MediaError(f"{name}: no video stream")
    return container.streams.video[0]


def decode_video(source: MediaInput, max_frames: int | None = None, threads: int = 1) -> np.ndarray:
    """The first `max_frames` (default all) frames as (T, H, W, 3) uint8 RGB.

    threads=1 decodes on one core (the data loader parallelises across samples instead); 0 lets
    FFmpeg pick. A stream that ends before the frame count in its header because packets are
    missing is reported as truncated rather than returned short, so a damaged file never silently
    becomes a shorter clip.
    """
    name = _name(source)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    target = _open_input(source)
    try:
        with av.open(target, mode="r") as container:
            stream = _video_stream(container, name)
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            declared = stream.frames
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except Exception as e:  # PyAV raises many error types (FFmpegError, OSError, EOFError, ValueError...)
        raise MediaError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from e
    if not frames:
        raise MediaError(f"{name}: video stream has no decodable frames")
    wanted = declared if max_frames is None else min(declared, max_frames)
    if declared > 0 and len(frames) < wanted:
        # Fewer frames than declared: a cut-off file (video_info raises, finding packets missing),
        # or a whole file whose edit list makes the decoder drop frames (kept as decoded).
        video_info(source)
    return np.stack(frames)


def decode_image(source: MediaInput) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB (grey, palette and alpha images are converted)."""
    name = _name(source)
    target = _open_input(source)
    try:
        with Image.open(target) as image:
            image.load()  # Image.open is lazy; load() is where truncation shows up
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError as e:  # its message names a BytesIO object, not the file
        raise MediaError(
            f"{name}: cannot decode image (not a known image format, or its header is damaged)"
        ) from e
    except Exception as e:  # OSError (truncated), SyntaxError (bad PNG chunks)...
        raise MediaError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def decode_media(source: MediaInput, ext: str, max_frames: int | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 for a video or an image (T=1), chosen by the extension."""
    ext = normalize_ext(ext)
    if ext in IMAGE_EXTS:
        return decode_image(source)[None]
    if ext in VIDEO_EXTS:
        return decode_video(source, max_frames=max_frames)
    raise MediaError(
        f"{_name(source)}: unsupported extension {ext!r} (images: {IMAGE_EXTS}, videos: {VIDEO_EXTS})",
        "unsupported",
    )


def video_info(source: MediaInput) -> dict:
    """{"frames", "fps", "height", "width"} from the container, without decoding pixels.

    The frames are counted by demuxing packets (reads the file, decodes nothing), which also works for
    containers without a frame count in the header (webm, some mkv) and catches truncated files.
    """
    name = _name(source)
    target = _open_input(source)
    try:
        with av.open(target, mode="r") as container:
            stream = _video_stream(container, name)
            declared = stream.frames
            # Count the packets actually present: a file cut short keeps its header (with the full
            # frame count) but loses packets, and demuxing finds that without decoding.
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            if declared > 0 and frames < declared:
                raise MediaError(
                    f"{name}: truncated video, header declares {declared} frames but "
                    f"only {frames} are stored",
                    "truncated",
                )
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            info = dict(
                frames=int(frames),
                fps=float(rate) if rate else 0.0,
                height=int(stream.codec_context.height),
                width=int(stream.codec_context.width),
            )
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{name}: cannot read video header ({type(e).__name__}: {e})") from e
    if info["frames"] <= 0 or info["height"] <= 0 or info["width"] <= 0:
        raise MediaError(f"{name}: video has no frames or no size ({info})")
    return info


def _check_frames(path: str, frames: np.ndarray, video: bool) -> np.ndarray:
    frames = np.asarray(frames)
    want = 4 if video else 3
    if frames.dtype != np.uint8 or frames.ndim != want or frames.shape[-1] != 3:
        layout = "(T, H, W, 3)" if video else "(H, W, 3)"
        raise MediaError(f"{path}: expected uint8 {layout} RGB, got {frames.dtype} {frames.shape}", "invalid")
    return frames


def write_video(
    path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 17, threads: int = 1
) -> None:
    """Writes an H.264 (yuv420p) mp4 that any player reads; written to a temporary name then renamed.

    yuv420p halves the chroma resolution, so height and width must be even. crf 17 is visually
    lossless; colours come back within a few levels. The encode runs in a fresh ffmpeg process
    (imageio-ffmpeg's binary): encoding through PyAV inside a long-lived process gave different
    bytes for the same frames now and then (x264 reading reused, uninitialised buffers), and the
    synthetic dataset must be byte-for-byte reproducible. threads=0 lets x264 pick a thread count.
    """
    path = os.fspath(path)
    frames = _check_frames(path, frames, video=True)
    t, h, w, _ = frames.shape
    if t == 0 or h % 2 or w % 2:
        raise MediaError(
            f"{path}: H.264 yuv420p needs >= 1 frame and even height/width, got {t} frames of {h}x{w}",
            "invalid",
        )
    if fps <= 0:
        raise MediaError(f"{path}: fps must be positive, got {fps}", "invalid")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp.mp4"
    rate = Fraction(fps).limit_denominator(1001)
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-y",
        "-loglevel",
        "error",
        "-nostdin",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        f"{rate.numerator}/{rate.denominator}",
        "-i",
        "-",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-crf",
        str(crf),
        "-threads",
        str(threads),
        # faststart puts the index first, so a truncated file is detected by its frame count.
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        tmp,
    ]
    try:
        result = subprocess.run(
            command,
            input=np.ascontiguousarray(frames).tobytes(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if result.returncode != 0:
            raise MediaError(
                f"{path}: ffmpeg failed (exit {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()[-500:]}"
            )
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"{path}: cannot write video ({type(e).__name__}: {e})") from e


def write_image(path: str | os.PathLike, frame: np.ndarray) -> None:
    """Writes an image; the format comes from the extension (png is lossless)."""
    path = os.fspath(path)
    frame = _check_frames(path, frame, video=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp" + os.path.splitext(path)[1]
    try:
        Image.fromarray(frame).save(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise MediaError(f"{path}: cannot write image ({type(e).__name__}: {e})") from e
