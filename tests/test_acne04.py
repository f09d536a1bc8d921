"""ACNE04 reader: both layouts, summary, the Dataset, and every rejection (one line, naming the file)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthtrial.data.acne04 import Acne04Dataset, Acne04Item, scan_acne04, summarize_acne04
from synthtrial.util.errors import SynthtrialError

# name -> (grade, count); counts sit in the right Hayashi level
LABELS = {"levle0_1.jpg": (0, 2), "levle0_2.jpg": (0, 5), "levle1_1.jpg": (1, 7),
          "levle2_1.jpg": (2, 21), "levle3_1.jpg": (3, 51)}
TEST0 = ("levle0_2.jpg", "levle2_1.jpg")


def _jpeg(path: Path, size=(48, 32), value=100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


def _voc(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(f"<object><name>acne</name><bndbox><xmin>{i}</xmin><ymin>{i}</ymin>"
                   f"<xmax>{i + 3}</xmax><ymax>{i + 4}</ymax></bndbox></object>" for i in range(n))
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{objs}</annotation>")


def _lines(names) -> str:
    return "".join(f"{n} {LABELS[n][0]} {LABELS[n][1]}\n" for n in names)


@pytest.fixture()
def released(tmp_path):
    root = tmp_path / "ACNE04"
    cls = root / "Classification"
    for k, name in enumerate(LABELS):
        _jpeg(cls / "JPEGImages" / name, value=k)
        _voc(root / "Detection" / "VOC2007" / "Annotations" / f"{Path(name).stem}.xml", LABELS[name][1])
    (cls / "NNEW_trainval_0.txt").write_text(_lines(n for n in LABELS if n not in TEST0))
    (cls / "NNEW_test_0.txt").write_text(_lines(TEST0))
    return root


@pytest.fixture()
def folders(tmp_path):
    root = tmp_path / "hf"
    _jpeg(root / "acne0_1024" / "a.jpg", (40, 64), 1)
    _jpeg(root / "acne0_1024" / "b.jpg", (64, 40), 2)
    _jpeg(root / "acne2_1024" / "c.jpg", value=3)
    _jpeg(root / "acne3_1024" / "d.jpg", value=4)
    (root / "acne3_1024" / "notes.txt").write_text("not an image")
    return root


def _raises(root, *needles, **kw) -> str:
    with pytest.raises(SynthtrialError) as info:
        scan_acne04(root, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


def test_released_layout(released):
    items = scan_acne04(released)
    assert [it.path.name for it in items] == sorted(LABELS, key=lambda n: (LABELS[n][0], n))
    for it in items:
        assert isinstance(it, Acne04Item)
        assert (it.level, it.count) == LABELS[it.path.name]
        assert it.path == released / "Classification" / "JPEGImages" / it.path.name
        assert it.boxes.dtype == np.float32 and it.boxes.shape == (it.count, 4)
        assert it.split == ("test_0" if it.path.name in TEST0 else "trainval_0")
    assert items[1].boxes[1].tolist() == [1, 1, 4, 5]
    s = summarize_acne04(items)
    assert s == {"images": 5, "per_level": {0: 2, 1: 1, 2: 1, 3: 1}, "boxes": 2 + 5 + 7 + 21 + 51,
                 "layout": "labels", "splits": ["trainval_0", "test_0"]}


def test_first_occurrence_split_and_flat_layout(tmp_path):
    # labels and images side by side in the root, no XML; an image repeated consistently in fold 1
    for name in LABELS:
        _jpeg(tmp_path / name)
    (tmp_path / "NNEW_trainval_0.txt").write_text(_lines(LABELS))
    (tmp_path / "NNEW_test_1.txt").write_text(_lines(["levle1_1.jpg"]))
    items = scan_acne04(tmp_path)
    assert {it.split for it in items} == {"trainval_0"}
    assert all(it.boxes is None for it in items)
    assert summarize_acne04(items)["boxes"] is None


def test_folder_layout(folders):
    items = scan_acne04(folders)
    assert [(it.level, it.path.name) for it in items] == [(0, "a.jpg"), (0, "b.jpg"), (2, "c.jpg"), (3, "d.jpg")]
    assert all(it.count is None and it.boxes is None and it.split is None for it in items)
    assert summarize_acne04(items) == {"images": 4, "per_level": {0: 2, 1: 0, 2: 1, 3: 1}, "boxes": None,
                                       "layout": "folders", "splits": []}


def test_dataset(folders, released):
    ds = Acne04Dataset(folders, size=32)
    assert len(ds) == 4
    for i in range(len(ds)):
        x = ds[i]
        assert x["pixel_values"].shape == (3, 32, 32) and x["pixel_values"].dtype == torch.float32
        assert x["pixel_values"].min() >= -1 and x["pixel_values"].max() <= 1
        assert x["pixel_values"].min() < -0.5 and x["pixel_values"].max() > 0.5  # uses the range
        assert x["count"] == -1 and x["path"].endswith(".jpg")
    assert [ds[i]["level"] for i in range(4)] == [0, 0, 2, 3]
    assert Acne04Dataset(folders, size=None)[0]["pixel_values"].shape == (3, 64, 40)
    assert Acne04Dataset(folders, size=20, center_crop=False)[1]["pixel_values"].shape == (3, 20, 32)
    only = Acne04Dataset(folders, levels=[2, 3], size=16)
    assert len(only) == 2 and {only[i]["level"] for i in range(2)} == {2, 3}
    lab = Acne04Dataset(scan_acne04(released), levels=[3], size=8)
    assert len(lab) == 1 and lab[0]["count"] == 51 and lab[0]["level"] == 3
    with pytest.raises(SynthtrialError):
        Acne04Dataset(folders, levels=[1])
    with pytest.raises(SynthtrialError):
        Acne04Dataset(folders, levels=[4])


def test_root_errors(tmp_path):
    _raises(tmp_path / "nope", "nope", "no such folder")
    (tmp_path / "f.txt").write_text("x")
    _raises(tmp_path / "f.txt", "f.txt", "not a folder")
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "empty", "NNEW_", "acne0_")
    (tmp_path / "acne4_1024").mkdir()
    _raises(tmp_path, "acne4_1024", "0-3")


@pytest.mark.parametrize("bad, needle", [
    ("levle0_1.jpg 0", "3 fields"),
    ("levle0_1.jpg 0 2 9", "3 fields"),
    ("levle0_1.jpg zero 2", "grade 'zero'"),
    ("levle0_1.jpg 0 2.5", "count '2.5'"),
    ("levle0_1.jpg 4 2", "outside 0-3"),
    ("levle0_1.jpg -1 2", "outside 0-3"),
])
def test_malformed_label_line(released, bad, needle):
    f = released / "Classification" / "NNEW_test_0.txt"
    f.write_text(_lines(TEST0) + "\n" + bad + "\n")
    _raises(released, f, "line 4", needle)


def test_conflicting_labels(released):
    f = released / "Classification" / "NNEW_test_0.txt"
    f.write_text(_lines(TEST0) + "levle0_1.jpg 0 3\n")
    msg = _raises(released, f, "line 3", "levle0_1.jpg", "NNEW_trainval_0.txt line 1")
    assert "count 3" in msg and "count 2" in msg


def test_missing_and_unreadable_image(released):
    img = released / "Classification" / "JPEGImages" / "levle1_1.jpg"
    img.write_bytes(b"not a jpeg at all")
    _raises(released, img, "unreadable")
    assert len(scan_acne04(released, check_images=False)) == 5
    img.unlink()
    _raises(released, "NNEW_trainval_0.txt", "line 2", "levle1_1.jpg", "missing")


def test_unreadable_image_in_folders(folders):
    bad = folders / "acne2_1024" / "c.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    _raises(folders, bad, "unreadable")


def test_boxes_disagree_with_labels(released):
    xml = released / "Detection" / "VOC2007" / "Annotations" / "levle1_1.xml"
    _voc(xml, 6)
    _raises(released, xml, "6 boxes", "count 7", "NNEW_trainval_0.txt line 2")
    # boxes agree with the count, but the grade is not the Hayashi level of the count
    _voc(xml, 7)
    f = released / "Classification" / "NNEW_trainval_0.txt"
    f.write_text(f.read_text().replace("levle1_1.jpg 1 7", "levle1_1.jpg 2 7"))
    _raises(released, xml, "Hayashi level 1", "grades levle1_1.jpg as 2")


@pytest.mark.parametrize("content, needle", [
    ("<annotation><object>", "malformed XML"),
    ("<annotation><object><name>a</name></object></annotation>", "no <bndbox>"),
    ("<annotation><object><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>3</ymax></bndbox>"
     "</object></annotation>", "<xmin>"),
    ("<other/>", "<annotation>"),
])
def test_malformed_xml(released, content, needle):
    xml = released / "Detection" / "VOC2007" / "Annotations" / "levle0_1.xml"
    xml.write_text(content)
    _raises(released, xml, needle)
