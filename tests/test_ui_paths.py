"""UI file safety: path confinement inside the allowed roots, upload checks, safe names."""
import os

import pytest

from sdlora.ui import paths
from sdlora.ui.paths import PathError, Roots, UploadError
from tiny import write_image

STYLES = os.path.join(os.path.dirname(__file__), "..", "sample_data", "styles")



# ---------------------------------------------------------------------------------------------
# path confinement

@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret.png").write_bytes(b"x")
    return root, outside


def test_confine_inside(tree):
    root, _ = tree
    roots = Roots.of(root)
    assert roots.confine("imgs") == (root / "imgs").resolve()                  # relative to the first root
    assert roots.confine(str(root / "imgs")) == (root / "imgs").resolve()      # absolute inside
    assert roots.confine("imgs/../imgs") == (root / "imgs").resolve()          # .. that stays inside
    assert roots.confine("new", must_exist=False) == (root / "new").resolve()


@pytest.mark.parametrize("bad", ["..", "../outside/secret", "imgs/../../outside", "/etc", "/", "~"])
def test_confine_refuses_escapes(tree, bad):
    root, _ = tree
    with pytest.raises(PathError, match="outside the allowed folders"):
        Roots.of(root).confine(bad)


def test_confine_refuses_symlink_escapes(tree):
    root, outside = tree
    (root / "link").symlink_to(outside / "secret")
    with pytest.raises(PathError, match="outside the allowed folders"):
        Roots.of(root).confine("link")
    with pytest.raises(PathError, match="outside the allowed folders"):
        Roots.of(root).confine("link/..")          # resolved through the link: outside
    (root / "inner").symlink_to(root / "imgs")     # a link that stays inside is fine
    assert Roots.of(root).confine("inner") == (root / "imgs").resolve()
    # a link inside an allowed folder pointing out: the folder is refused for training
    (root / "imgs" / "x.png").symlink_to(outside / "secret.png")
    with pytest.raises(PathError, match="x.png"):
        Roots.of(root).confine_tree(root / "imgs")


def test_confine_other_errors(tree):
    root, _ = tree
    roots = Roots.of(root)
    for bad, msg in [("", "no folder given"), ("a\0b", "NUL"), ("missing", "does not exist")]:
        with pytest.raises(PathError, match=msg):
            roots.confine(bad)
    (root / "f.txt").write_text("x")
    with pytest.raises(PathError, match="is a file"):
        roots.confine("f.txt")
    with pytest.raises(PathError, match="no folders are allowed"):
        Roots.of().confine("x")


# ---------------------------------------------------------------------------------------------
# uploads

@pytest.mark.parametrize("fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")])
def test_check_image_by_content(tmp_path, fmt, ext):
    assert paths.check_image(write_image(tmp_path / "upload.bin", fmt)) == ext


def test_check_image_refusals(tmp_path, monkeypatch):
    fake = tmp_path / "fake.png"
    fake.write_text("<html>not an image</html>")
    with pytest.raises(UploadError, match="not a PNG, JPEG"):
        paths.check_image(fake)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UploadError, match="not a readable PNG"):
        paths.check_image(broken)
    big = write_image(tmp_path / "big.png", "PNG", (64, 64))
    with pytest.raises(UploadError, match="over the"):
        paths.check_image(big, max_bytes=10)
    monkeypatch.setattr(paths, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UploadError, match="pixels"):
        paths.check_image(big)


def test_check_caption(tmp_path):
    ok = tmp_path / "a.txt"
    ok.write_text("neonstyle, a red circle", encoding="utf-8")
    assert paths.check_caption(ok) == "neonstyle, a red circle"
    for data, msg in [(b"\x00\x01", "binary"), (b"\xff\xfe\xfa", "UTF-8"), (b"x" * (paths.MAX_CAPTION_BYTES + 1), "too long")]:
        (tmp_path / "b.txt").write_bytes(data)
        with pytest.raises(UploadError, match=msg):
            paths.check_caption(tmp_path / "b.txt")


def test_import_training_upload(tmp_path):
    up = tmp_path / "up"
    up.mkdir()
    a = write_image(up / "a.png", "PNG")
    b = write_image(up / "b.png", "JPEG")          # named .png, holds a JPEG: stored as b.jpg
    cap = up / "a.txt"
    cap.write_text("neonstyle")
    dest = tmp_path / "data" / "set"
    assert paths.import_training_upload([a, b, cap], dest) == (2, 1)
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "a.txt", "b.jpg"]
    # one bad file: nothing is written
    bad = up / "c.png"
    bad.write_text("nope")
    with pytest.raises(UploadError, match="c.png"):
        paths.import_training_upload([a, bad], tmp_path / "data" / "other")
    assert not (tmp_path / "data" / "other").exists()
    with pytest.raises(UploadError, match="no images"):
        paths.import_training_upload([cap], tmp_path / "data" / "x")
    with pytest.raises(UploadError, match="no files"):
        paths.import_training_upload([], tmp_path / "data" / "x")
    same = up / "sub"
    same.mkdir()
    with pytest.raises(UploadError, match="several uploaded files"):
        paths.import_training_upload([a, write_image(same / "a.png", "PNG")], tmp_path / "data" / "y")


def test_safe_name():
    assert paths.safe_name("../../etc/passwd") == "passwd"
    assert paths.safe_name("..\\..\\win.ini") == "win.ini"
    assert paths.safe_name("my style<1>") == "my style_1_"
    for bad in ["", "..", "/", " . "]:
        with pytest.raises(PathError):
            paths.safe_name(bad)
