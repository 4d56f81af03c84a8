"""Media IO: mp4/png round trips, and every kind of unreadable input raising MediaError naming it."""

import re

import numpy as np
import pytest

from sama_jax.data import video_io
from sama_jax.data.video_io import MediaError


def _moving_square(t=9, h=64, w=96):
    frames = np.full((t, h, w, 3), 30, np.uint8)
    for i in range(t):
        frames[i, 16:40, 4 + 6 * i : 28 + 6 * i] = (220, 60, 40)
    return frames


@pytest.fixture
def mp4(tmp_path):
    path = tmp_path / "clip.mp4"
    video_io.write_video(path, _moving_square(), fps=16)
    return path


def test_video_round_trip(mp4):
    frames = _moving_square()
    decoded = video_io.decode_video(mp4)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    diff = np.abs(decoded.astype(int) - frames)
    # H.264 at crf 17 with 4:2:0 chroma: pixels away from colour edges are within a few levels.
    assert diff.mean() < 2.0
    for i in range(9):  # the square's interior, two pixels in from its edges
        interior = decoded[i, 18:38, 6 + 6 * i : 26 + 6 * i].astype(int)
        assert np.abs(interior - np.array([220, 60, 40])).max() <= 10
    background = np.abs(decoded[:, 50:60, 4:90].astype(int) - 30)
    assert background.max() <= 4
    assert video_io.video_info(mp4) == dict(frames=9, fps=16.0, height=64, width=96)


def test_bytes_and_max_frames(mp4):
    blob = mp4.read_bytes()
    first = video_io.decode_video(blob, max_frames=4)
    assert first.shape == (4, 64, 96, 3)
    np.testing.assert_array_equal(first, video_io.decode_video(mp4)[:4])
    assert video_io.decode_media(blob, "MP4").shape == (9, 64, 96, 3)
    assert video_io.video_info(blob)["frames"] == 9


def test_image_round_trip(tmp_path, rng):
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    video_io.write_image(path, image)
    np.testing.assert_array_equal(video_io.decode_image(path), image)
    media = video_io.decode_media(path.read_bytes(), ".png")
    assert media.shape == (1, 24, 40, 3)
    np.testing.assert_array_equal(media[0], image)


def test_odd_size_and_bad_dtype_rejected(tmp_path):
    with pytest.raises(MediaError, match="odd.mp4.*even"):
        video_io.write_video(tmp_path / "odd.mp4", np.zeros((3, 33, 32, 3), np.uint8), fps=8)
    with pytest.raises(MediaError, match="f.mp4.*uint8"):
        video_io.write_video(tmp_path / "f.mp4", np.zeros((3, 32, 32, 3), np.float32), fps=8)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_video(tmp_path, mp4, cut):
    blob = mp4.read_bytes()
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(blob[: int(len(blob) * cut)])
    with pytest.raises(MediaError, match="cut.mp4"):
        video_io.decode_video(bad)
    with pytest.raises(MediaError, match="cut.mp4.*truncated") as caught:
        video_io.video_info(bad)
    assert caught.value.reason == "truncated"


def test_unreadable_inputs_name_the_file(tmp_path, mp4):
    missing = tmp_path / "missing.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all " * 50)
    header_only = tmp_path / "header.mp4"
    header_only.write_bytes(mp4.read_bytes()[:100])
    for path, problem, reason in [
        (missing, "does not exist", "missing"),
        (empty, "empty", "empty"),
        (garbage, "cannot", "corrupt"),
        (header_only, "", "corrupt"),
    ]:
        for read in (video_io.decode_video, video_io.video_info):
            with pytest.raises(MediaError, match=f"{path.name}.*{problem}") as caught:
                read(path)
            assert caught.value.reason == reason
    with pytest.raises(MediaError, match="<bytes>"):
        video_io.decode_video(b"\x00" * 64)
    with pytest.raises(MediaError, match="is a directory"):
        video_io.decode_video(tmp_path)


def test_bad_images(tmp_path, rng):
    good = tmp_path / "good.png"
    video_io.write_image(good, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG nonsense" * 10)
    for path in (truncated, garbage, tmp_path / "none.png"):
        with pytest.raises(MediaError, match=path.name):
            video_io.decode_image(path)
    with pytest.raises(MediaError, match="unsupported extension"):
        video_io.decode_media(good, ".txt")


def test_cut_at_a_packet_boundary_is_truncated_not_short(mp4):
    """A file cut exactly between packets decodes without a codec error; it must still be refused."""
    import io

    import av

    blob = mp4.read_bytes()
    with av.open(io.BytesIO(blob)) as container:
        ends = [p.pos + p.size for p in container.demux(container.streams.video[0]) if p.size]
    assert len(ends) == 9 and ends[-1] == len(blob)
    for kept in (1, 4, 8):
        with pytest.raises(MediaError, match=f"declares 9 frames but only {kept} are stored") as caught:
            video_io.decode_video(blob[: ends[kept - 1]])
        assert caught.value.reason == "truncated"
    # Asking only for frames that are all there still works on the cut file.
    assert video_io.decode_video(blob[: ends[7]], max_frames=2).shape == (2, 64, 96, 3)


def test_check_media_file_is_the_one_existence_check(tmp_path, mp4):
    assert video_io.check_media_file(mp4) == mp4.stat().st_size > 0
    assert video_io.check_media_file(str(mp4)) == mp4.stat().st_size
    (tmp_path / "empty.png").write_bytes(b"")
    for path, message, reason in [
        (tmp_path / "gone.mp4", "gone.mp4: file does not exist", "missing"),
        (tmp_path / "empty.png", "empty.png: empty file (0 bytes)", "empty"),
        (tmp_path, "is a directory, not a media file", "missing"),
    ]:
        with pytest.raises(MediaError, match=re.escape(message)) as caught:
            video_io.check_media_file(path)
        assert caught.value.reason == reason
        # Decoders report exactly what the check says.
        with pytest.raises(MediaError, match=re.escape(message)):
            video_io.decode_image(path)
