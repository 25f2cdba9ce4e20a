"""Image loading, the evaluation transform (timm parity) and the failure-tolerant datasets."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from mixnet import create_model
from mixnet.data.images import (ImageList, ImageLoadError, LabelledImageFolder, FailedSample, build_eval_transform,
                         collate, list_image_files, load_image)
from mixnet.errors import MixNetError



@pytest.fixture(scope="module")
def timm_data():
    """timm's data module, the oracle for the transform (only the parity tests need timm)."""
    pytest.importorskip("timm")
    import timm.data

    return timm.data


@pytest.fixture(scope="module")
def timm_transform(timm_data):
    import timm

    model = timm.create_model("mixnet_s", pretrained=False)
    return timm_data.create_transform(**timm_data.resolve_data_config({}, model=model))


@pytest.fixture(scope="module")
def our_transform():
    with torch.device("meta"):
        model = create_model("mixnet_s")
    return build_eval_transform(model)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: resampling differences would show, unlike in flat images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1)], axis=-1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Transform parity with timm


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (300, 200), (200, 300), (17, 900), (1001, 333), (64, 48)])
def test_eval_transform_matches_timm_for_any_size(size, timm_transform, our_transform):
    img = Image.fromarray(photo_like(*size, seed=size[0]))
    expected = timm_transform(img)
    got = our_transform(img)
    assert got.shape == (3, 224, 224)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def expected_rgb(img: Image.Image) -> np.ndarray:
    """The 8-bit RGB pixels of ``img`` computed with numpy from its raw values, independently of the
    loader: grey repeated, palette looked up, 16-bit grey divided by 257, bilevel to 0/255, CMYK (black
    0 here) inverted; alpha is opaque in these images."""
    raw = np.asarray(img)
    if img.mode in ("L", "LA"):
        grey = raw if img.mode == "L" else raw[..., 0]
        return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode.startswith("I;16"):
        return np.repeat(np.rint(raw / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode == "1":
        return np.repeat(np.where(raw, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode == "P":
        return np.asarray(img.getpalette(), np.uint8).reshape(-1, 3)[raw]
    if img.mode == "CMYK":
        assert not raw[..., 3].any()
        return 255 - raw[..., :3]
    return raw[..., :3]  # RGB, RGBA


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB"])
def test_loading_any_mode_gives_the_expected_rgb_pixels(tmp_path, mode):
    rgb = Image.fromarray(photo_like(320, 240, seed=3))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
        assert img.mode.startswith("I;16")
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    expected = expected_rgb(Image.open(path))  # what was written, as read back raw
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (320, 240)
    assert np.array_equal(np.asarray(loaded), expected)
    if mode in ("RGB", "RGBA", "CMYK"):  # lossless colour modes: the photo itself
        assert np.array_equal(expected, np.asarray(rgb))


def test_eval_transform_uses_config_fields(timm_data):
    cfg = dict(input_size=(3, 128, 128), crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
               std=(0.5, 0.5, 0.5))
    ours = build_eval_transform(cfg)
    theirs = timm_data.create_transform(input_size=(3, 128, 128), crop_pct=1.0, interpolation="bilinear",
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = Image.fromarray(photo_like(200, 150))
    assert torch.allclose(ours(img), theirs(img), atol=1e-6, rtol=0)
    with pytest.raises(MixNetError, match="interpolation"):
        build_eval_transform({**cfg, "interpolation": "nope"})


def test_eval_transform_size_and_crop_overrides_match_timm_at_those_values(timm_data):
    cfg = dict(input_size=(3, 128, 128), crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
               std=(0.229, 0.224, 0.225))
    ours = build_eval_transform(cfg, image_size=96, crop_pct=0.7)
    theirs = timm_data.create_transform(input_size=(3, 96, 96), crop_pct=0.7, interpolation="bicubic",
                                        mean=cfg["mean"], std=cfg["std"])
    img = Image.fromarray(photo_like(200, 150))
    assert torch.allclose(ours(img), theirs(img), atol=1e-6, rtol=0)
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(MixNetError, match=f"crop_pct must be in \\(0, 1\\].*got {bad}"):
            build_eval_transform(cfg, crop_pct=bad)
    with pytest.raises(MixNetError, match="image size must be at least 1 pixel, got 0"):
        build_eval_transform(cfg, image_size=0)


# ---------------------------------------------------------------------------------------------
# Loading real files of each kind


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "bmp", "gif", "tiff"])
def test_load_each_format(tmp_path, ext):
    array = photo_like(40, 30)
    path = tmp_path / f"img.{ext}"
    Image.fromarray(array).save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if ext in ("png", "bmp", "tiff"):  # lossless formats round-trip exactly
        assert np.array_equal(np.asarray(loaded), array)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    pixel = np.asarray(load_image(path))[8, 8]
    assert pixel[0] > 200 and pixel[2] < 50


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    img.paste(1, (0, 0, 5, 10))
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert "transparency" in Image.open(path).info
    out = np.asarray(load_image(path))
    assert tuple(out[5, 2]) == (255, 0, 0)
    assert tuple(out[5, 8]) == (255, 255, 255)


def test_rgba_and_la_alpha_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(load_image(tmp_path / "la.png"))[2, 2]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    r, g, b = np.asarray(load_image(tmp_path / "c.jpg"))[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.full((6, 6), 32768, np.uint16)  # mid grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    value = np.asarray(load_image(tmp_path / "g16.png"))[3, 3]
    assert tuple(value) == (128, 128, 128)


@pytest.mark.parametrize("dtype, white", [(np.float32, 1.0), (np.float32, 255.0), (np.int32, 65535),
                                          (np.int32, 2 ** 31 - 1)])
def test_float_and_32_bit_grey_tiffs_are_scaled_from_the_range_their_values_span(tmp_path, dtype, white):
    grey = np.zeros((6, 8), dtype)
    grey[:, 4:] = white  # left half black, right half the range's white, one pixel mid grey
    grey[0, 0] = white / 2
    Image.fromarray(grey).save(tmp_path / "g.tif")
    assert Image.open(tmp_path / "g.tif").mode == ("F" if dtype == np.float32 else "I")
    rgb = np.asarray(load_image(tmp_path / "g.tif"))
    assert tuple(rgb[3, 1]) == (0, 0, 0) and tuple(rgb[3, 6]) == (255, 255, 255)
    assert tuple(rgb[0, 0]) in ((127, 127, 127), (128, 128, 128))


@pytest.mark.parametrize("orientation, expected_size", [(1, (40, 20)), (6, (20, 40)), (8, (20, 40)), (3, (40, 20))])
def test_exif_orientation_applied(tmp_path, orientation, expected_size):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red, right half blue
    array[:, 20:] = (0, 0, 255)
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == expected_size
    out = np.asarray(loaded).astype(int)
    if orientation == 6:  # rotate 90 clockwise to display: the left (red) half ends on top
        assert out[2, 10, 0] > 200 and out[-3, 10, 2] > 200
    if orientation == 8:  # rotate 90 counter-clockwise: red ends at the bottom
        assert out[-3, 10, 0] > 200 and out[2, 10, 2] > 200
    if orientation == 3:  # 180 degrees: red on the right
        assert out[10, -3, 0] > 200 and out[10, 2, 2] > 200


def test_an_opened_image_gets_the_exif_orientation_its_file_gets(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "o.jpg"
    img.save(path, exif=exif, quality=95)
    identity = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731
    with Image.open(path) as opened:
        from_file, from_image = ImageList([path, opened], transform=identity)[0][0], ImageList([opened], identity)[0][0]
    assert from_image.shape == from_file.shape == (40, 20, 3)
    assert torch.equal(from_image, from_file)
    upright = load_image(path)  # already transposed: no orientation tag left, so it stays as it is
    assert torch.equal(ImageList([upright], identity)[0][0], from_file)


def test_truncated_empty_and_non_image_are_reported_by_name(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(photo_like(64, 64)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    for path, problem in [(truncated, "cannot decode"), (empty, "empty"), (text, "not an image"),
                          (tmp_path / "missing.png", "no such file")]:
        with pytest.raises(ImageLoadError, match=problem) as info:
            load_image(path)
        assert str(path) in str(info.value) and info.value.path == str(path)
        assert isinstance(info.value, MixNetError)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_decompression_bomb_refused(tmp_path):
    # A real PNG header announcing 100000 x 100000 pixels (10 Gpixel) with a tiny body.
    width = height = 100_000
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _png_chunk(b"IEND", b""))
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    with pytest.raises(ImageLoadError, match="refused") as info:
        load_image(path)
    assert "bomb.png" in str(info.value)
    # Our own limit applies below Pillow's, and from the header alone.
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(ImageLoadError, match="refused"):
        load_image(small, max_pixels=5000)
    assert load_image(small, max_pixels=10_000).size == (100, 100)


# ---------------------------------------------------------------------------------------------
# Listing files and datasets


def test_list_image_files(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ["a/2.JPG", "a/1.png", "a/deep/3.webp", "a/readme.txt", "a/.hidden.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    explicit = tmp_path / "explicit.dat"
    explicit.write_bytes(b"x")
    files = list_image_files([tmp_path / "a", explicit])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/1.png", "a/2.JPG", "a/deep/3.webp",
                                                                    "explicit.dat"]
    assert [f.name for f in list_image_files(tmp_path / "a", recursive=False)] == ["1.png", "2.JPG"]
    with pytest.raises(MixNetError, match="nope"):
        list_image_files([tmp_path / "nope"])


def test_labelled_folder_skips_and_reports_corrupt_files(tmp_path):
    for cls, colour in [("cat", (255, 0, 0)), ("dog", (0, 255, 0))]:
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), colour).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image extension")
    transform = build_eval_transform(dict(input_size=(3, 16, 16), crop_pct=1.0, interpolation="bicubic",
                                          mean=(0, 0, 0), std=(1, 1, 1)))
    ds = LabelledImageFolder(tmp_path, transform=transform)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate))
    images = torch.cat([b.images for b in batches])
    targets = torch.cat([b.targets for b in batches])
    failures = [f for b in batches for f in b.failures]
    assert images.shape == (4, 3, 16, 16) and targets.tolist() == [0, 0, 1, 1]
    assert len(failures) == 1 and failures[0].path.endswith("broken.jpg") and isinstance(failures[0], FailedSample)
    # green images carry the dog label
    assert torch.all(images[targets == 1][:, 1] > 0.99)

    mapped = LabelledImageFolder(tmp_path, class_to_idx={"dog": 7})
    assert mapped.classes == ["dog"] and {t for _, t in mapped.samples} == {7}


def test_collate_all_failed_and_image_list(tmp_path):
    batch = collate([FailedSample("a.jpg", "bad"), FailedSample("b.jpg", "bad")])
    assert batch.images.numel() == 0 and batch.targets.numel() == 0 and len(batch.failures) == 2
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    ds = ImageList([tmp_path / "ok.png", tmp_path / "missing.png", Image.new("L", (8, 8))],
                   transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    batch = collate([ds[i] for i in range(3)])
    assert batch.targets.tolist() == [0, 2] and batch.images.shape == (2, 8, 8, 3)
    assert batch.failures[0].path.endswith("missing.png")


def test_labelled_folder_errors(tmp_path):
    with pytest.raises(MixNetError, match="no such directory"):
        LabelledImageFolder(tmp_path / "nope")
    with pytest.raises(MixNetError, match="no class folders"):
        LabelledImageFolder(tmp_path)


def test_a_long_thin_image_is_cut_to_the_middle_before_the_resize(our_transform):
    cut = our_transform.transforms[0]  # mixnet_s: resized to 256 px, cut beyond 16 million pixels
    photo = Image.fromarray(photo_like(900, 17))
    assert cut(photo) is photo  # what fits passes unchanged (timm parity above, 17 x 900 included)
    assert cut(Image.new("RGB", (400_000, 1))).size == (35, 1)  # the resize would make 102 million pixels
    thin = Image.fromarray(photo_like(20, 5_000))  # 256 x 64,000 once resized
    assert cut(thin).size == (20, 92)
    # What the crop keeps is the same as without the cut, up to the resize's sub-pixel grid.
    plain = transforms.Compose(our_transform.transforms[1:])
    assert (our_transform(thin) - plain(thin)).abs().mean() < 0.05


def test_a_folder_link_to_its_parent_lists_each_image_once(tmp_path):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("photos/1.jpg", "photos/sub/2.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "photos" / "sub" / "up").symlink_to(tmp_path / "photos")
    files = list_image_files(tmp_path / "photos")
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["photos/1.jpg", "photos/sub/2.jpg"]


def test_a_class_folder_linking_back_to_the_dataset_labels_each_photo_once_and_by_its_own_folder(tmp_path):
    for name in ("cat/1.jpg", "cat/2.jpg", "dog/3.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dog" / "all").symlink_to(tmp_path)  # e.g. a link made by mistake: back to the root
    (tmp_path / "dog" / "more").symlink_to(tmp_path / "cat")  # a deliberate link to another folder's photos
    samples = [(os.path.relpath(p, tmp_path), t) for p, t in LabelledImageFolder(tmp_path).samples]
    assert samples == [("cat/1.jpg", 0), ("cat/2.jpg", 0), ("dog/3.jpg", 1), ("dog/more/1.jpg", 1),
                       ("dog/more/2.jpg", 1)]
