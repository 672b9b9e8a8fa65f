"""Decoding of hostile files, degradations, augmentation, preprocessing and the collator."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers import CLIPImageProcessorPil

from mirage_hf.data import load_image_folder
from mirage_hf.transforms import (
    ROBUSTNESS_SWEEP,
    BadImageReport,
    DetectionCollator,
    ImageLoadError,
    Preprocessor,
    TrainAugmentation,
    degrade,
    downscale,
    gaussian_blur,
    jpeg,
    open_image,
)

S = 32


@pytest.fixture
def processor():
    return CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})


def noise_image(size=(48, 40), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG that declares `width` x `height` RGB pixels but holds almost no data: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def high_freq_energy(img: Image.Image) -> float:
    grey = pixels(img).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


# --------------------------------------------------------------------------- open_image: failures


def assert_load_error(source, reason_pattern: str, name: str | None):
    with pytest.raises(ImageLoadError, match=reason_pattern) as err:
        open_image(source)
    assert isinstance(err.value, ValueError)
    if name is not None:
        assert name in str(err.value) and err.value.source == name
    return err.value


def test_open_image_rejects_empty_garbage_missing_and_directory(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    assert_load_error(str(tmp_path / "zero.png"), "empty file", str(tmp_path / "zero.png"))
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    assert_load_error(str(tmp_path / "random.jpg"), "not an image", str(tmp_path / "random.jpg"))
    assert_load_error(str(tmp_path / "missing.png"), "not found", str(tmp_path / "missing.png"))
    assert_load_error(str(tmp_path), "is a directory", str(tmp_path))
    assert_load_error(b"", "empty file", None)
    assert_load_error({"path": None, "bytes": None}, "neither bytes nor a path", None)
    assert_load_error(12345, "unsupported source type int", None)


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_open_image_truncated_raises_even_if_pil_is_told_to_pad(tmp_path, monkeypatch, fmt, suffix):
    whole = save(noise_image((64, 64)), tmp_path / f"whole{suffix}", format=fmt).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole[: len(whole) // 2])
    assert_load_error(str(cut), "truncated", str(cut))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a global some libraries set
    assert_load_error(str(cut), "truncated", str(cut))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


@pytest.mark.parametrize("preset_flag", [False, True])
def test_concurrent_calls_mixing_truncated_and_whole_files_each_get_their_own_answer(
    tmp_path, monkeypatch, preset_flag
):
    """The Space decodes requests on several threads at once: each truncated file fails and each whole one decodes
    to its own pixels, whatever PIL's process-wide flag says, and the flag is never changed."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", preset_flag)
    jobs = []
    for index, (fmt, suffix) in enumerate([("JPEG", ".jpg"), ("PNG", ".png")] * 2):
        whole = save(noise_image((192, 160), seed=index), tmp_path / f"whole{index}{suffix}", format=fmt)
        cut = tmp_path / f"cut{index}{suffix}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
        with Image.open(whole) as reference:
            jobs += [(str(whole), np.asarray(reference.convert("RGB"))), (str(cut), None)]

    def answer(job):
        path, pixels = job
        try:
            image = open_image(path)
        except ImageLoadError as error:
            return pixels is None and error.reason.startswith("truncated file")
        return pixels is not None and np.array_equal(np.asarray(image), pixels)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(answer, jobs * 40))
    assert all(answers), f"{answers.count(False)} of {len(answers)} calls got another call's answer"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is preset_flag


@pytest.mark.parametrize("side", [100_000, 10_000])  # beyond PIL's hard limit / between its warning and error
def test_open_image_rejects_decompression_bomb_before_decoding(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(side, side))
    assert bomb.stat().st_size < 200
    err = assert_load_error(str(bomb), "too large", str(bomb))
    assert "bomb" in err.reason


def test_open_image_pixel_limit_is_configurable():
    data = io.BytesIO()
    noise_image((20, 20)).save(data, "PNG")
    assert open_image(data.getvalue()).size == (20, 20)
    with pytest.raises(ImageLoadError, match="20x20 pixels exceeds the limit of 100"):
        open_image(data.getvalue(), max_pixels=100)


# --------------------------------------------------------------------------- open_image: odd but valid files


def test_open_image_tiny_and_source_kinds(tmp_path):
    path = save(Image.new("RGB", (1, 1), (10, 20, 30)), tmp_path / "one.png")
    for source in (
        str(path),
        path,
        path.read_bytes(),
        {"path": str(path), "bytes": None},
        {"path": "elsewhere.png", "bytes": path.read_bytes()},
    ):
        img = open_image(source)
        assert img.mode == "RGB" and img.size == (1, 1) and img.getpixel((0, 0)) == (10, 20, 30)


def test_open_image_16_bit_grey_is_rescaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    path = save(Image.fromarray(ramp), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    img = open_image(path)
    expected = np.rint(ramp / 257.0)
    assert img.mode == "RGB"
    assert np.abs(pixels(img)[..., 0] - expected).max() <= 1
    assert pixels(img).std() > 50  # PIL's own convert would make most of it white


def test_open_image_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), tmp_path / "cmyk.jpg", format="JPEG", quality=95)
    red, green, blue = pixels(open_image(path))[4, 4]
    assert red > 230 and green < 25 and blue > 230  # magenta


def test_open_image_alpha_and_palette_composite_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # half-transparent red
    img = open_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert np.allclose(pixels(img)[0, 0], [255, 127, 127], atol=2)

    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], axis=-1), "LA")
    assert pixels(open_image(save(la, tmp_path / "la.png")))[0, 0].tolist() == [255, 255, 255]

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    img = open_image(save(palette, tmp_path / "palette.png", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (255, 0, 0)
    opaque = Image.new("P", (4, 4), 1)
    opaque.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert open_image(save(opaque, tmp_path / "opaque.gif")).getpixel((0, 0)) == (0, 0, 255)


def test_open_image_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 0, 0))
    img.paste((0, 0, 200), (0, 0, 10, 20))  # blue on the left when stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    upright = open_image(save(img, tmp_path / "rotated.jpg", exif=exif, quality=95))
    assert upright.size == (20, 40)
    assert pixels(upright)[5, 10, 2] > 150  # the stored left edge is now at the top


def test_open_image_animation_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    img = open_image(path)
    assert img.mode == "RGB" and img.getpixel((4, 4)) == (255, 0, 0)


# --------------------------------------------------------------------------- degradations


def test_jpeg_lower_quality_differs_more():
    img = noise_image()
    errors = {q: np.abs(pixels(jpeg(img, q)) - pixels(img)).mean() for q in (95, 30)}
    assert 0 < errors[95] < errors[30]
    assert jpeg(img, 30).size == img.size and jpeg(img, 30).mode == "RGB"
    assert pixels(jpeg(img, 50)).tolist() == pixels(jpeg(img, 50)).tolist()  # deterministic


def test_jpeg_of_an_image_wider_than_the_jpeg_limit_keeps_it_whole():
    """A side over 65,500 px is legal for PNG but not for JPEG: the JPEG step (training augmentation, robustness
    sweep) must still degrade such an image rather than stop the run."""
    wide = Image.fromarray(np.tile(np.arange(70_000, dtype=np.uint8)[None, :, None] * 7, (3, 1, 3)))
    out = jpeg(wide, 50)
    assert out.size == wide.size and out.mode == "RGB"
    assert 0 < np.abs(pixels(out) - pixels(wide)).mean() < 40
    assert degrade(wide, "jpeg", 30).size == wide.size


def test_jpeg_in_tiles_matches_one_encoding_away_from_the_tile_borders(monkeypatch):
    import mirage_hf.transforms as transforms

    img = noise_image(size=(96, 72))
    whole = pixels(jpeg(img, 75))
    monkeypatch.setattr(transforms, "JPEG_TILE", 32)
    tiled = pixels(jpeg(img, 75))
    rows, columns = ([i for i in range(n) if i % 32 not in (0, 31)] for n in (72, 96))  # off the tile borders
    np.testing.assert_array_equal(tiled[np.ix_(rows, columns)], whole[np.ix_(rows, columns)])
    assert not np.array_equal(tiled, whole), "chroma differs at the borders: the tiled path really ran"


def test_blur_reduces_high_frequency_energy():
    img = noise_image()
    energies = [high_freq_energy(gaussian_blur(img, s)) for s in (0, 1, 2, 3)]
    assert energies[0] == high_freq_energy(img)
    assert energies[0] > 2 * energies[1] and energies[1] > energies[2] > energies[3]


def test_downscale_keeps_size_and_loses_detail():
    img = noise_image()
    half, quarter = downscale(img, 0.5), downscale(img, 0.25)
    assert half.size == quarter.size == img.size
    assert high_freq_energy(img) > high_freq_energy(half) > high_freq_energy(quarter)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        downscale(img, 2.0)


def test_degrade_dispatches_the_sweep():
    img = noise_image()
    for kind, values in ROBUSTNESS_SWEEP.items():
        for value in values:
            assert degrade(img, kind, value).size == img.size
    assert pixels(degrade(img, "blur", 2)).tolist() == pixels(gaussian_blur(img, 2)).tolist()
    with pytest.raises(ValueError, match="unknown degradation 'noise'"):
        degrade(img, "noise", 1)


# --------------------------------------------------------------------------- augmentation and preprocessing


def all_on(seed=0) -> TrainAugmentation:
    return TrainAugmentation(S, flip_prob=0.5, resize_prob=0.5, blur_prob=0.5, jpeg_prob=0.5, seed=seed)


@pytest.mark.parametrize("size", [(100, 80), (S, S), (10, 50)])
def test_augmentation_output_size_and_tensor_range(processor, size):
    images = [noise_image(size, seed) for seed in range(6)]
    out = [all_on()(img) for img in images]
    assert all(img.size == (S, S) and img.mode == "RGB" for img in out)
    batch = Preprocessor(processor, augmentation=all_on())(images)
    assert batch.shape == (6, 3, S, S) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    assert (batch >= -mean / std - 1e-4).all() and (batch <= (1 - mean) / std + 1e-4).all()


def test_augmentation_is_reproducible_and_seed_dependent():
    images = [noise_image((60, 50), seed) for seed in range(8)]

    def run(seed):
        augment = all_on(seed)
        return [pixels(augment(img)).tolist() for img in images]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_augmentation_reseeds_per_dataloader_worker():
    images = [noise_image((60, 50), 0)] * 4  # identical inputs: differences come from the draws only
    augment = TrainAugmentation(S, seed=0)
    loader = torch.utils.data.DataLoader(
        images,
        batch_size=1,
        num_workers=2,
        collate_fn=lambda batch: pixels(augment(batch[0])),
        generator=torch.Generator().manual_seed(0),
    )
    first, second = [out for _, out in zip(range(2), loader, strict=False)]  # one batch from each worker
    assert not np.array_equal(first, second)


def test_preprocessor_modes(processor):
    big = noise_image((64, 64))
    resized = Preprocessor(processor, mode="resize")([big])
    assert torch.allclose(resized, processor(images=[big], return_tensors="pt")["pixel_values"])
    cropped = Preprocessor(processor, mode="center_crop")([big])
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    expected = ((pixels(big)[16:48, 16:48] / 255.0 - mean) / std).transpose(2, 0, 1)
    assert np.allclose(cropped[0].numpy(), expected, atol=1e-5)  # pixels untouched, only normalised
    small = Preprocessor(processor, mode="center_crop")([noise_image((10, 12))])
    assert small.shape == (1, 3, S, S)
    assert torch.allclose(small[0, :, 0, 0], torch.tensor(-mean / std, dtype=torch.float32))  # black padding
    assert Preprocessor(processor)([]).shape == (0, 3, S, S)
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        Preprocessor(processor, mode="stretch")
    with pytest.raises(ValueError, match="image_size=32"):
        Preprocessor(processor, augmentation=TrainAugmentation(64))


# --------------------------------------------------------------------------- collator


@pytest.fixture
def mixed_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    save(noise_image((40, 40), 1), tmp_path / "real" / "good_real.png")
    save(noise_image((40, 40), 2), tmp_path / "fake" / "good_fake.jpg")
    (tmp_path / "fake" / "empty.png").write_bytes(b"")
    (tmp_path / "real" / "garbage.jpg").write_bytes(b"\xff\xd8 not really")
    return tmp_path


def test_collator_drops_bad_rows_and_keeps_labels(processor, mixed_folder):
    ds = load_image_folder(mixed_folder)
    rows = list(ds)
    batch = DetectionCollator(Preprocessor(processor, mode="center_crop"))(rows)
    kept = [r for r in rows if Path(r["image"]["path"]).stem.startswith("good")]
    assert batch["pixel_values"].shape == (2, 3, S, S)
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [r["label"] for r in kept]
    assert sorted(batch["labels"].tolist()) == [0, 1]
    assert batch["subsets"] == [mixed_folder.name] * 2
    failed = dict(batch["failed"])
    assert set(failed) == {str(mixed_folder / "fake" / "empty.png"), str(mixed_folder / "real" / "garbage.jpg")}
    assert "empty file" in failed[str(mixed_folder / "fake" / "empty.png")]


def test_collator_all_bad_batch_is_empty_not_an_error(processor):
    rows = [
        {"image": {"bytes": b"junk", "path": None}, "label": 1, "subset": "x"},
        {"image": {"bytes": None, "path": "/nonexistent/a.png"}, "label": 0, "subset": "x"},
    ]
    batch = DetectionCollator(Preprocessor(processor))(rows)
    assert batch["pixel_values"].shape == (0, 3, S, S)
    assert batch["labels"].shape == (0,) and batch["subsets"] == []
    assert [source for source, _ in batch["failed"]] == [0, "/nonexistent/a.png"]  # row index without a path


def test_collator_in_dataloader_with_report(processor, mixed_folder):
    ds = load_image_folder(mixed_folder)
    collate = DetectionCollator(Preprocessor(processor, augmentation=TrainAugmentation(S)))
    report = BadImageReport(max_examples=1)
    seen = 0
    for batch in torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate):
        report.add(batch["failed"])
        seen += len(batch["labels"])
    assert seen == 2 and report.count == 2 and len(report.examples) == 1
    assert report.summary().startswith("2 image(s) could not be loaded")
    assert str(report.examples[0][0]) in report.summary()
    assert BadImageReport().summary() == "all images loaded"
