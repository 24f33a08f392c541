import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ganlab import config, data
from ganlab.data import BadImage, DataError


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgba_passes_through():
    arr = np.random.RandomState(0).randint(0, 256, (8, 8, 4), dtype=np.uint8)
    out = data.decode_image(png_bytes(Image.fromarray(arr, "RGBA")), 8)
    assert (out == arr).all()


def test_palette_with_transparency():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    img.info["transparency"] = 1
    out = data.decode_image(png_bytes(img, transparency=1), 8)
    assert out.shape == (8, 8, 4)
    assert (out[:, :4, 3] == 0).all() and (out[:, 4:, 3] == 255).all()
    assert (out[:, 4:, :3] == [255, 0, 0]).all()


def test_la_l_rgb_cmyk():
    la = Image.fromarray(np.dstack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 50, np.uint8)]), "LA")
    o = data.decode_image(png_bytes(la), 4)
    assert (o[..., :3] == 100).all() and (o[..., 3] == 50).all()
    o = data.decode_image(png_bytes(Image.new("L", (4, 4), 77)), 4)
    assert (o[..., :3] == 77).all() and (o[..., 3] == 255).all()
    o = data.decode_image(png_bytes(Image.new("RGB", (4, 4), (1, 2, 3))), 4)
    assert (o[..., :3] == [1, 2, 3]).all() and (o[..., 3] == 255).all()
    o = data.decode_image(png_bytes(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100), 4)
    assert o[..., 0].mean() > 200 and o[..., 1].mean() < 60 and (o[..., 3] == 255).all()


def test_16_bit_grey_is_rescaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    o = data.decode_image(png_bytes(img), 4)
    assert abs(int(o[0, 0, 0]) - 128) <= 1 and (o[..., 3] == 255).all()


def test_exif_orientation_is_applied():
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[:, :4] = 255  # left half white, 8 wide x 4 high
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    raw = png_bytes(img, "JPEG", exif=exif.tobytes(), quality=100)
    o = data.decode_image(raw, 8, fit="pad")
    # after rotation the image is 4 wide x 8 high, padded left and right with transparency
    assert o[:, 0, 3].max() == 0 and o[:, 3, 3].min() == 255


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    o = data.decode_image(buf.getvalue(), 4)
    assert o[..., 0].mean() > 200 and o[..., 2].mean() < 50


def test_resize_pad_and_crop():
    img = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    pad = data.decode_image(png_bytes(img), 8, "pad")
    crop = data.decode_image(png_bytes(img), 8, "crop")
    assert pad[0, :, 3].max() == 0 and pad[4, :, 3].min() == 255
    assert crop[..., 3].min() == 255


@pytest.mark.parametrize("blob", [b"", b"not an image at all", png_bytes(Image.new("RGB", (64, 64)))[:60]])
def test_bad_bytes_raise_badimage(blob):
    with pytest.raises(BadImage):
        data.decode_image(blob, 8)


def test_one_pixel_image_is_fine():
    o = data.decode_image(png_bytes(Image.new("RGBA", (1, 1), (9, 8, 7, 6))), 8)
    assert o.shape == (8, 8, 4)


def test_decompression_bomb_is_skipped(monkeypatch):
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    with pytest.raises(BadImage, match="limit"):
        data.decode_image(png_bytes(Image.new("L", (100, 100))), 8)


def make_folder(root: Path, n: int, size=12, sub="emoji") -> Path:
    rng = np.random.RandomState(0)
    (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.randint(0, 256, (size, size, 4), dtype=np.uint8)
        Image.fromarray(arr, "RGBA").save(root / sub / f"img{i:03d}.png")
    return root


def cfg_for(root, tmp_path, **kw):
    sets = [f"data.root={root}", "data.image_size=32", f"data.cache_dir={tmp_path / 'cache'}", "data.min_holdout=8"]
    sets += [f"data.{k}={v}" for k, v in kw.items()]
    return config.load(None, sets)


def test_folder_with_bad_files_is_skipped_and_counted(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs", 40)
    (root / "emoji" / "zero.png").write_bytes(b"")
    (root / "emoji" / "junk.png").write_bytes(b"hello")
    good = (root / "emoji" / "img000.png").read_bytes()
    (root / "emoji" / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("ignored: not an image extension")
    s = data.load_images(cfg_for(root, tmp_path).data)
    assert len(s.train) + len(s.holdout) == 40
    assert len(s.skipped) == 3
    assert "skipped 3" in caplog.text and "zero.png" in caplog.text


def test_holdout_is_disjoint_deterministic_and_sized(tmp_path):
    root = make_folder(tmp_path / "imgs", 60)
    c = cfg_for(root, tmp_path, holdout=0.1, min_holdout=10)
    a = data.load_images(c.data)
    b = data.load_images(c.data)
    assert len(a.holdout) == 10 and len(a.train) == 50
    assert torch.equal(a.holdout, b.holdout) and a.holdout_hash == b.holdout_hash
    train_rows = {bytes(t.numpy().tobytes()) for t in a.train}
    assert not any(bytes(h.numpy().tobytes()) in train_rows for h in a.holdout)


def test_holdout_does_not_depend_on_file_order():
    imgs = torch.randint(0, 256, (100, 4, 4, 4), dtype=torch.uint8)
    perm = torch.randperm(100)
    o1 = [i for g in data.holdout_groups(imgs) for i in g]
    o2 = [int(perm[i]) for g in data.holdout_groups(imgs[perm]) for i in g]
    assert o1 == o2


def test_holdout_splits_by_content_so_a_renamed_copy_stays_on_one_side(tmp_path):
    """The same image under two names (twemoji64 has 34 such): both copies on one side, counted. A
    split by file name puts about 10% of the copies' twins in the held-out set."""
    import shutil

    root = make_folder(tmp_path / "imgs", 60)
    files = sorted(root.rglob("*.png"))
    for i, f in enumerate(files[:30]):
        shutil.copy(f, f.parent / f"copy_{i:03d}.png")
    s = data.load_images(cfg_for(root, tmp_path, holdout=0.2, min_holdout=10).data)
    train_rows = {bytes(t.numpy().tobytes()) for t in s.train}
    assert not any(bytes(h.numpy().tobytes()) in train_rows for h in s.holdout)
    assert s.duplicates == 30 and "30 exact duplicate" in s.describe()
    assert len(s.holdout) + len(s.train) == 90 and len(s.holdout) >= 18


def test_decode_cache_hit(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", 20)
    c = cfg_for(root, tmp_path)
    first = data.load_images(c.data)
    assert list((tmp_path / "cache").glob("images-*.pt"))

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_decode_all", boom)
    second = data.load_images(c.data)
    assert torch.equal(first.train, second.train)


def test_empty_and_all_bad_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        data.load_images(cfg_for(tmp_path / "empty", tmp_path).data)
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="0 usable image"):
        data.load_images(cfg_for(tmp_path / "bad", tmp_path).data)


def test_symlink_loop_terminates(tmp_path):
    root = make_folder(tmp_path / "imgs", 4)
    os.symlink(root, root / "emoji" / "loop")
    assert len(data.find_images(root)) == 4


def test_builtin_sprites_are_deterministic_rgba_with_soft_edges():
    a = data.make_sprites(16, 32, seed=1)
    b = data.make_sprites(16, 32, seed=1)
    assert torch.equal(a, b) and a.shape == (16, 4, 32, 32)
    alpha = a[:, 3].float()
    assert (alpha == 0).float().mean() > 0.1  # transparent background
    assert ((alpha > 10) & (alpha < 245)).float().mean() > 0.02  # partly transparent edges


def test_premultiplied_removes_colour_under_transparency():
    u8 = torch.tensor([[[[200]], [[100]], [[50]], [[0]]]], dtype=torch.uint8)  # colour under alpha 0
    pm = data.to_model_space(u8, "premultiplied")
    st = data.to_model_space(u8, "straight")
    assert torch.allclose(pm[0, :, 0, 0], torch.tensor([-1.0, -1, -1, -1]))
    assert st[0, 0, 0, 0] > 0
    back = data.to_straight_u8(
        data.to_model_space(torch.tensor([[[[200]], [[100]], [[50]], [[128]]]], dtype=torch.uint8), "premultiplied"),
        "premultiplied",
    )
    assert (back[0, :, 0, 0].int() - torch.tensor([200, 100, 50, 128])).abs().max() <= 2


def test_batches_are_a_pure_function_of_the_index():
    u8 = torch.randint(0, 256, (40, 4, 8, 8), dtype=torch.uint8)
    a = data.Batches(u8, 8, seed=3, alpha="straight", device="cpu")
    b = data.Batches(u8, 8, seed=3, alpha="straight", device="cpu")
    seq = [a(i) for i in range(12)]
    assert torch.equal(b(7), seq[7]) and torch.equal(b(11), seq[11])
    with pytest.raises(DataError, match="fewer than one batch"):
        data.Batches(u8[:5], 8, 0, "straight", "cpu")


def test_host_resident_batches_reach_the_model_device():
    """data.placement=host keeps the set in host memory; every batch must still arrive on the model's
    device. 'meta' stands in for a GPU here: a batch left on the CPU would fail the device check."""
    u8 = torch.randint(0, 256, (40, 4, 8, 8), dtype=torch.uint8)
    b = data.Batches(u8, 8, seed=0, alpha="straight", device="meta", placement="host")
    assert b.data.device.type == "cpu" and not b.resident
    x = b(3)
    assert x.device.type == "meta" and x.shape == (8, 4, 8, 8)
    same = data.Batches(u8, 8, seed=0, alpha="straight", device="cpu", placement="host")
    resident = data.Batches(u8, 8, seed=0, alpha="straight", device="cpu", placement="device")
    assert torch.equal(same(5), resident(5))  # where the set lives never changes the stream
