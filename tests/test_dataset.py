"""training.dataset: image modes, EXIF, captions, repeat folders, buckets, bad files, data order."""
import io
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sdlora.training import dataset as ds


def _img(path, size=(64, 64), color=(200, 30, 30), mode="RGB", **save):
    Image.new(mode, size, color).save(path, **save)
    return path


# --- images -------------------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)          # left half red, right half blue (as stored)
    a[:, 20:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6                 # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    got = ds.load_image(tmp_path / "r.jpg")
    assert got.size == (20, 40)      # upright: portrait
    px = np.asarray(got).astype(int)
    # rotating 90 degrees clockwise puts the stored left (red) on top and the right (blue) at the bottom
    assert px[5, 10, 0] > 200 and px[5, 10, 2] < 60
    assert px[35, 10, 2] > 200 and px[35, 10, 0] < 60
    scan = ds.scan(tmp_path, min_image_size=1)
    assert scan.items[0].size == (20, 40)


def test_modes_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 255, 0, 0))                  # fully transparent -> white background
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")            # transparent black -> white
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.save(tmp_path / "p.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")   # red in CMYK
    i16 = Image.fromarray(np.full((8, 8), 32896, np.uint16))               # 16-bit mid grey (0x8080)
    i16.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = {p.stem: np.asarray(ds.load_image(p)) for p in tmp_path.iterdir()}
    assert all(a.dtype == np.uint8 and a.shape == (8, 8, 3) for a in out.values())
    assert tuple(out["rgba"][0, 0]) == (255, 255, 255) and tuple(out["rgba"][1, 1]) == (255, 0, 0)
    assert tuple(out["la"][3, 3]) == (255, 255, 255)
    assert tuple(out["p"][3, 3]) == (10, 20, 30)
    assert out["cmyk"][3, 3, 0] > 200 and out["cmyk"][3, 3, 1] < 60
    assert tuple(out["g16"][3, 3]) == (128, 128, 128)      # scaled from 16 bit, not clipped to white


def test_to_tensor_range():
    t = ds.to_tensor(Image.new("RGB", (4, 2), (0, 255, 128)))
    assert t.shape == (3, 2, 4)
    assert t[0].max() == -1 and t[1].min() == 1 and abs(float(t[2, 0, 0]) - (128 / 127.5 - 1)) < 1e-6


# --- captions and folders -------------------------------------------------------------------------

def test_captions_from_txt_caption_trigger_and_folder_names(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square,  flat colour\n")
    _img(tmp_path / "b.png")
    (tmp_path / "b.caption").write_text("kohya caption")
    _img(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("from txt")
    (tmp_path / "c.caption").write_text("from caption")
    _img(tmp_path / "d.png")                                     # no caption
    sub = tmp_path / "10_neon city"
    sub.mkdir()
    _img(sub / "e.png")
    plain = tmp_path / "more"
    plain.mkdir()
    _img(plain / "f.png")
    scan = ds.scan(tmp_path, repeats=2, min_image_size=1)
    cap = {it.path.name: (it.caption, it.caption_source, it.repeats, it.folder) for it in scan.items}
    assert cap["a.png"] == ("a red square, flat colour", "file", 2, tmp_path.name)
    assert cap["b.png"][:2] == ("kohya caption", "file")
    assert cap["c.png"][:2] == ("from txt", "file")              # first extension wins
    assert cap["d.png"][:2] == ("", "none")
    assert cap["e.png"] == ("neon city", "folder", 10, "10_neon city")
    assert cap["f.png"][1:3] == ("folder", 2)
    info = {f.name: (f.images, f.captions, f.repeats) for f in scan.folders}
    assert info[tmp_path.name] == (4, 3, 2) and info["10_neon city"] == (1, 0, 10)

    scan = ds.scan(tmp_path, trigger="zzt", class_word="style", min_image_size=1)
    cap = {it.path.name: it.caption for it in scan.items}
    assert cap["a.png"] == "zzt, a red square, flat colour"
    assert cap["d.png"] == "zzt style" and cap["e.png"] == "zzt style"
    scan = ds.scan(tmp_path, caption_extensions=[".caption"], min_image_size=1)
    assert {it.path.name: it.caption for it in scan.items}["c.png"] == "from caption"


def test_tag_frequency_counts_tags_per_folder(tmp_path):
    for i, c in enumerate(["red, square", "red, circle", "blue, circle"]):
        _img(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(c)
    scan = ds.scan(tmp_path, min_image_size=1)
    assert ds.tag_frequency(scan.items) == {tmp_path.name: {"red": 2, "square": 1, "circle": 2, "blue": 1}}


def test_bad_images_are_skipped_and_listed(tmp_path):
    _img(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _img(tmp_path / "tiny.png", size=(8, 8))
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    scan = ds.scan(tmp_path, min_image_size=16)
    assert [it.path.name for it in scan.items] == ["good.png"]
    why = {p.name: r for p, r in scan.skipped}
    assert set(why) == {"broken.png", "truncated.jpg", "tiny.png"}
    assert why["tiny.png"].startswith("too small (8x8") and why["broken.png"].startswith("unreadable")


def test_empty_missing_and_non_image_folders_are_clear_errors(tmp_path):
    with pytest.raises(ds.DatasetError, match="does not exist"):
        ds.scan(tmp_path / "nope")
    with pytest.raises(ds.DatasetError, match="it is empty"):
        ds.scan(tmp_path)
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(ds.DatasetError, match=r"1 other file\(s\), e.g. readme.md"):
        ds.scan(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ds.DatasetError, match="bad.png: unreadable"):
        ds.scan(tmp_path)
    with pytest.raises(ds.DatasetError, match="is a file"):
        ds.scan(tmp_path / "readme.md")


# --- buckets --------------------------------------------------------------------------------------

def test_buckets_follow_kohyas_scheme():
    b = ds.make_buckets(512, 64, 256, 1024)
    assert (512, 512) in b and (256, 1024) in b and (1024, 256) in b and (384, 640) in b and (640, 384) in b
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in b)
    assert all((h, w) in b for w, h in b)
    assert ds.nearest_bucket((2000, 1000), b) == (704, 320)     # 2:1 -> the 2.2 bucket (640x384 is 1.67)
    assert ds.nearest_bucket((1000, 1000), b) == (512, 512)
    assert ds.make_buckets(64, 32, 32, 128) == sorted({(64, 64), (32, 128), (128, 32), (32, 96), (96, 32)})


def test_resize_and_crop_covers_the_bucket():
    im = Image.new("RGB", (100, 50))
    out, (top, left) = ds.resize_and_crop(im, (64, 64), None)
    assert out.size == (64, 64) and (top, left) == (0, (128 - 64) // 2)
    seen = {ds.resize_and_crop(im, (64, 64), random.Random(s))[1] for s in range(20)}
    assert len(seen) > 3 and all(t == 0 and 0 <= l <= 64 for t, l in seen)


# --- randomness and order -------------------------------------------------------------------------

def test_caption_shuffle_keeps_leading_tokens_and_dropout():
    cap = "zzt, a, b, c, d, e"
    outs = {ds.process_caption(cap, random.Random(s), shuffle=True, keep_tokens=1, dropout=0.0) for s in range(30)}
    assert len(outs) > 5 and all(o.startswith("zzt, ") and sorted(o.split(", ")) == sorted(cap.split(", "))
                                 for o in outs)
    drops = [ds.process_caption(cap, random.Random(s), shuffle=False, keep_tokens=0, dropout=0.3) for s in range(400)]
    assert 0.2 < drops.count("") / 400 < 0.4 and set(drops) == {"", cap}
    assert ds.sample_rng(1, 2, 3).random() == ds.sample_rng(1, 2, 3).random() != ds.sample_rng(1, 2, 4).random()


def _items(n_train=5, n_reg=0):
    items = [ds.ImageItem(f"t{i}.png", "", "none", "a", 1 + i % 3, (64, 64), (64, 64) if i % 2 else (64, 32))
             for i in range(n_train)]
    items += [ds.ImageItem(f"r{i}.png", "", "none", "r", 1, (64, 64), (64, 64), is_reg=True) for i in range(n_reg)]
    return items


def test_epoch_batches_are_deterministic_bucket_pure_and_repeat_items():
    items = _items()
    a = ds.epoch_batches(items, 2, seed=3, epoch=0)
    assert [[(s.item, s.slot) for s in b] for b in a] == \
        [[(s.item, s.slot) for s in b] for b in ds.epoch_batches(items, 2, seed=3, epoch=0)]
    assert [[s.item for s in b] for b in a] != [[s.item for s in b] for b in ds.epoch_batches(items, 2, 3, 1)]
    assert all(len({items[s.item].bucket for s in b}) == 1 for b in a)
    assert Counter(s.item for b in a for s in b) == {i: it.repeats for i, it in enumerate(items)}
    assert sorted(s.slot for b in a for s in b) == list(range(sum(it.repeats for it in items)))
    three = ds.epoch_batches(items, 1, 3, 0, num_processes=3)
    assert len(three) % 3 == 0 and len(three) <= len(ds.epoch_batches(items, 1, 3, 0))


def test_class_images_are_balanced_with_training_samples():
    items = _items(n_train=3, n_reg=2)
    batches = ds.epoch_batches(items, 1, 0, 0)
    reg = sum(1 for b in batches for s in b if items[s.item].is_reg)
    assert reg == sum(it.repeats for it in items if not it.is_reg)
