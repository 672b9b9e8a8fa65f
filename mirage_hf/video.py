"""Videos for `mirage-detect` and the Space: which files are videos, which instants to score, the frames there.

Container formats (mp4, m4v, mov, mkv, webm, avi) are decoded with PyAV (the `[video]` extra), animated GIFs with
PIL. The instants are uniform over the duration: `n` equal segments, each sampled at its middle, where `n` is
`max_frames` (capped by the frame count when the container states it) or `fps` per second of video. Each sample
seeks to the keyframe before its instant and decodes forward only to it, so a long video costs its samples, not
its length; a sample less than `SEEK_GAP` seconds after the previous one is reached by decoding forward instead.
The frame scored at an instant is the one on screen then: the last one starting at or before it.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from fractions import Fraction

from PIL import Image

from .transforms import MAX_IMAGE_PIXELS, ImageLoadError, file_problem, open_image

VIDEO_EXTENSIONS = frozenset({".avi", ".m4v", ".mkv", ".mov", ".mp4", ".webm"})
"""Decoded as videos through PyAV. Animated GIFs (`.gif` with more than one frame) are videos as well."""
DEFAULT_MAX_FRAMES = 16
SEEK_GAP = 2.0  # seconds: a later sample at most this far ahead is reached by decoding forward, not by a seek
GIF_MIN_FRAME_SECONDS = 0.1  # browsers show GIF frames of 0-10 ms for 100 ms; so is their time here
VIDEO_EXTRA = "video support needs PyAV: pip install 'mirage-hf[video]'"
STILL_IMAGE = "a still image, not a video"  # score_video's reason for a GIF of one frame


class VideoLoadError(ImageLoadError):
    """A video that cannot be scored; `source` is its path, `reason` says why (an error row in a scan)."""

    def __init__(self, source: str | None, reason: str):
        super().__init__(source, reason)
        self.args = (f"cannot load video {source}: {reason}",)


def maybe_video(path: str) -> bool:
    """Whether `path` is read as a video by its name (a `.gif` only when animated, see `sample_times`)."""
    extension = os.path.splitext(path)[1].lower()
    return extension in VIDEO_EXTENSIONS or extension == ".gif"


def segment_middles(duration: float, count: int) -> list[float]:
    """The middles of `count` equal segments of [0, duration): the instants scored."""
    return [(index + 0.5) * duration / count for index in range(count)]


def _sample_count(duration: float, fps: float | None, max_frames: int, frame_count: int | None) -> int:
    count = math.ceil(duration * fps - 1e-9) if fps else max_frames
    if frame_count:
        count = min(count, frame_count)
    return max(1, count)


def _why(err: Exception) -> str:
    """An FFmpeg error's message without its errno and the path (the row names the file already)."""
    return f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"


def _av():
    try:
        import av
    except ImportError as err:
        raise ImportError(VIDEO_EXTRA) from err
    return av


def _open_container(path: str):
    """The PyAV container of `path` and its first video stream; VideoLoadError naming the problem otherwise."""
    if problem := file_problem(path, "a video"):
        raise VideoLoadError(path, problem)
    try:
        av = _av()
    except ImportError as err:
        raise VideoLoadError(path, str(err)) from err
    try:
        container = av.open(path)
    except Exception as err:  # noqa: BLE001 - FFmpeg's error classes for unreadable data are many
        raise VideoLoadError(path, f"not a readable video ({_why(err)})") from err
    if not container.streams.video:
        container.close()
        raise VideoLoadError(path, "no video stream (audio or data only)")
    stream = container.streams.video[0]
    if stream.width * stream.height > MAX_IMAGE_PIXELS:
        container.close()
        raise VideoLoadError(path, f"too large: {stream.width}x{stream.height} pixels per frame")
    return container, stream


def _start_and_duration(container, stream) -> tuple[float, float]:
    """(start, duration) in seconds: from the stream, else the container, else the last packet's end."""
    base = stream.time_base or Fraction(1, 1_000_000)
    start = float((stream.start_time or 0) * base)
    if stream.duration:
        return start, float(stream.duration * base)
    if container.duration:
        return start, container.duration / 1_000_000
    end = start
    for packet in container.demux(stream):  # no duration in the header (some webm): read the packets, no decoding
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * base))
    return start, end - start


def _gif_frame_starts(img: Image.Image) -> list[float]:
    """Start time of each frame of an animated GIF, and its end as the last element."""
    starts = [0.0]
    for index in range(img.n_frames):
        img.seek(index)
        starts.append(starts[-1] + max(GIF_MIN_FRAME_SECONDS, img.info.get("duration", 0) / 1000))
    return starts


def _open_gif(path: str) -> Image.Image | None:
    """The animated GIF at `path`, or None for a single-frame GIF (an image) or a file that is no GIF."""
    try:
        img = Image.open(path)
    except Exception:  # noqa: BLE001 - not a GIF after all: scored (and reported) as an image
        return None
    if img.format == "GIF" and getattr(img, "is_animated", False):
        return img
    img.close()
    return None


def sample_times(path: str, fps: float | None = None, max_frames: int = DEFAULT_MAX_FRAMES) -> list[float] | None:
    """The instants (seconds from the start) to score in the video at `path`; None when it is a still image
    (a `.gif` of one frame). Raises VideoLoadError: missing, empty, not a video, no video stream, no duration."""
    if os.path.splitext(path)[1].lower() == ".gif" and os.path.isfile(path):
        img = _open_gif(path)
        if img is None:
            return None
        with img:
            try:
                starts = _gif_frame_starts(img)
            except Exception as err:  # noqa: BLE001 - a GIF whose later frames are damaged
                raise VideoLoadError(path, f"corrupt animated GIF ({_why(err)})") from err
            return segment_middles(starts[-1], _sample_count(starts[-1], fps, max_frames, len(starts) - 1))
    container, stream = _open_container(path)
    with container:
        try:
            _, duration = _start_and_duration(container, stream)
        except Exception as err:  # noqa: BLE001
            raise VideoLoadError(path, f"corrupt video ({_why(err)})") from err
        if duration <= 0:
            raise VideoLoadError(path, "no duration (no frame with a timestamp)")
        return segment_middles(duration, _sample_count(duration, fps, max_frames, stream.frames or None))


def _gif_frames(path: str, times: Sequence[float]) -> list[Image.Image]:
    with Image.open(path) as img:
        starts = _gif_frame_starts(img)
        frames = []
        for time in times:
            img.seek(min(bisect.bisect_right(starts, time) - 1, img.n_frames - 1))
            frames.append(open_image(img.copy()))
        return frames


def _rgb_image(frame, converter) -> Image.Image:
    """A decoded frame as an RGB image, converted by the caller's own `converter` rather than `frame.to_image()`'s
    per-thread one (PyAV >= 18.1.1): a forked DataLoader worker that reuses a converter its parent made hangs on the
    parent's scaling threads."""
    plane = converter.reformat(frame, format="rgb24").planes[0]
    return Image.frombuffer("RGB", (plane.width, plane.height), bytes(plane), "raw", "RGB", plane.line_size, 1)


def _container_frames(path: str, times: Sequence[float]) -> list[Image.Image]:
    container, stream = _open_container(path)  # first: a VideoLoadError naming the extra where PyAV is missing
    converter = _av().video.reformatter.VideoReformatter()  # this call's own: see _rgb_image
    with container:
        base = stream.time_base
        start, duration = _start_and_duration(container, stream)
        slack = max(1.0, 2 / float(stream.average_rate)) if stream.average_rate else 1.0
        frames, decoded, shown, upcoming = [], None, None, None  # upcoming: decoded, starts after the last instant
        for time in sorted(times):
            target = start + time + 1e-6
            last = upcoming if upcoming is not None else shown
            if decoded is None or target - last.time > SEEK_GAP:
                container.seek(int(target / base), stream=stream, backward=True)
                decoded = (frame for frame in container.decode(stream) if frame.time is not None)
                shown, upcoming = None, None
            while upcoming is None or upcoming.time <= target:  # decode up to the first frame starting after it
                shown = upcoming if upcoming is not None else shown
                if (upcoming := next(decoded, None)) is None:
                    break
            frame = shown if shown is not None else upcoming  # nothing before it (a stream's first frame): the first
            if frame is None or target - frame.time > slack:
                end = "nothing" if frame is None else f"{frame.time - start:.2f} s"
                raise VideoLoadError(
                    path, f"truncated: no frame at {time:.2f} s of {duration:.2f} s (data ends at {end})"
                )
            frames.append(_rgb_image(frame, converter))
        return frames


def video_frames(path: str, times: Sequence[float]) -> list[Image.Image]:
    """RGB frames of the video at `path` shown at the instants `times` (sorted, from `sample_times`).

    Raises VideoLoadError for a video that cannot be decoded there (truncated, corrupt)."""
    try:
        if os.path.splitext(path)[1].lower() == ".gif":
            return _gif_frames(path, times)
        return _container_frames(path, times)
    except ImageLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - FFmpeg and PIL raise many types on corrupt data
        raise VideoLoadError(path, f"corrupt video ({_why(err)})") from err


class VideoScores:
    """A video's frame scores gathered chunk by chunk (memory does not grow with its length) into its verdict.

    The video's p(fake) is the mean of its frames' (each frame the one shown at an instant uniform over the
    duration, so it is a time average), judged like an image's: the same threshold and unsure band. With
    stability the mean of each degraded copy over the frames is its copy's p(fake) (`mirage_hf.stability`)."""

    def __init__(self):
        self.count, self.fake, self.p_fake_max, self.sums = 0, 0, 0.0, None

    def add(self, scores, labels: Sequence[str]) -> None:
        """`scores`: (frames, 1 or 1 + copies) p(fake) of a chunk; `labels`: the frames' verdicts."""
        self.count += len(scores)
        self.fake += sum(label == "fake" for label in labels)
        self.p_fake_max = max(self.p_fake_max, float(scores[:, 0].max()))
        self.sums = scores.sum(0) if self.sums is None else self.sums + scores.sum(0)

    def verdict(self, detector, threshold: float | None = None):
        means = self.sums / self.count
        return detector.verdict(means[0], threshold, means[1:] if len(means) > 1 else None)

    @property
    def fake_fraction(self) -> float:
        return self.fake / self.count


def score_video(detector, path: str, fps=None, max_frames=DEFAULT_MAX_FRAMES, stability=False, batch_size=16,
                threshold=None):  # fmt: skip
    """(the video's Verdict, its VideoScores, [(instant, frame Verdict)]) for the video at `path`, decoded and
    scored `batch_size` frames at a time. Raises VideoLoadError."""
    times = sample_times(path, fps, max_frames)
    if times is None:
        raise VideoLoadError(path, STILL_IMAGE)
    video, frames = VideoScores(), []
    for start in range(0, len(times), batch_size):
        chunk = times[start : start + batch_size]
        scores = detector.scores(video_frames(path, chunk), stability)
        verdicts = detector.verdicts(scores, threshold)
        video.add(scores, [verdict.label for verdict in verdicts])
        frames += zip(chunk, verdicts)
    return video.verdict(detector, threshold), video, frames
