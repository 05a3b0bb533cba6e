import json

import cv2
import numpy as np
import pytest
from PIL import Image

from sam3studio.export import MAX_STEM_CHARS, CocoDatasetWriter, OutputPathError, decode_rle, encode_rle, has_holes, mask_polygons, result_document, safe_path, safe_stem, write_result
from sam3studio.types import Instance, Result


def _result():
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:25] = True
    mask[8:10, 12:14] = False
    return Result([Instance("red car", 0.8765432, (10.0, 5.0, 25.0, 20.0), mask, 0)], (30, 40), [], "tiny", "bf16", "fp32", True, {"total": 12.3456})


def test_rle_round_trip_and_string_counts():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((37, 53)) > 0.6
        rle = encode_rle(mask)
        assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
        assert np.array_equal(decode_rle(rle), mask)
        assert np.array_equal(decode_rle(json.loads(json.dumps(rle))), mask)


def test_document_schema():
    doc = result_document(_result(), "photo.jpg")
    assert set(doc) == {"image", "width", "height", "model", "precision", "fallback_fp32", "timings_ms", "instances"}
    assert doc["precision"] == {"requested": "bf16", "used": "fp32"} and doc["fallback_fp32"] is True
    inst = doc["instances"][0]
    assert set(inst) == {"label", "score", "box", "area", "segmentation"}
    assert inst["area"] == 15 * 15 - 4 and inst["score"] == 0.87654
    assert np.array_equal(decode_rle(inst["segmentation"]), _result().instances[0].mask)


def _decoded_polygons(mask):
    from pycocotools import mask as coco_mask

    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(mask_polygons(mask), *mask.shape))).astype(bool)


def test_polygons_decode_back_to_the_mask_unless_it_has_holes():
    square, line, pixel = np.zeros((3, 30, 40), bool)
    square[5:8, 10:13] = True  # came back 2x2 when the outline ran through the pixels' centres
    line[12, 3:30] = True  # one pixel wide: had no polygon at all
    pixel[29, 39] = True
    corners = np.eye(20, 40, dtype=bool)  # pixels touching at corners only
    blobs = cv2.ellipse(cv2.circle(np.zeros((30, 40), np.uint8), (8, 20), 6, 1, -1), ((28, 12), (20, 7), 35), 1, -1).astype(bool)
    for mask in (square, line, pixel, corners, blobs, np.ones((30, 40), bool)):
        assert not has_holes(mask) and np.array_equal(_decoded_polygons(mask), mask)
    holed = _result().instances[0].mask
    assert has_holes(holed) and np.array_equal(_decoded_polygons(holed), _decoded_polygons(holed) | holed)
    assert _decoded_polygons(holed).sum() == holed.sum() + 4, "a polygon cannot cut out the hole"


def test_write_all_formats(tmp_path):
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    written = write_result(_result(), image, "photo.jpg", tmp_path, "photo", ["json", "png", "polygons"])
    names = sorted(p.name for p in written)
    assert names == ["photo.json", "photo.polygons.json", "photo_000_red-car.png", "photo_overlay.png"]
    mask = np.asarray(Image.open(tmp_path / "photo_000_red-car.png"))
    assert set(np.unique(mask)) == {0, 255} and mask.shape == (30, 40)
    assert json.loads((tmp_path / "photo.json").read_text())["image"] == "photo.jpg"


def test_a_prompt_as_long_as_allowed_still_writes_its_png(tmp_path):
    result = _result()
    result.instances[0].label = "red " * 124 + "car"  # 499 characters, within MAX_PROMPT_CHARS
    [png, _overlay] = write_result(result, np.zeros((30, 40, 3), np.uint8), "photo.jpg", tmp_path, "photo", ["png"])
    assert png.exists() and len(png.name) < 100


def test_coco_dataset(tmp_path):
    writer = CocoDatasetWriter()
    writer.add(_result(), "a.jpg")
    writer.add(_result(), "b.jpg")
    doc = json.loads(writer.write(tmp_path).read_text())
    assert [i["file_name"] for i in doc["images"]] == ["a.jpg", "b.jpg"]
    assert doc["categories"] == [{"id": 1, "name": "red car", "supercategory": "object"}]
    ann = doc["annotations"][1]
    assert ann["image_id"] == 2 and ann["bbox"] == [10.0, 5.0, 15.0, 15.0]
    assert ann["iscrowd"] == 1 and isinstance(ann["segmentation"], dict), "a mask with a hole goes as RLE"
    solid = _result()
    solid.instances[0].mask[8:10, 12:14] = True
    writer.add(solid, "c.jpg")
    doc = json.loads(writer.write(tmp_path).read_text())
    assert doc["annotations"][2]["iscrowd"] == 0 and isinstance(doc["annotations"][2]["segmentation"], list)
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = doc
    coco.createIndex()
    assert np.array_equal(coco.annToMask(coco.anns[1]), _result().instances[0].mask)
    assert np.array_equal(coco.annToMask(coco.anns[3]), solid.instances[0].mask)


def test_paths_never_leave_the_output_folder(tmp_path):
    assert safe_path(tmp_path, "a.json") == (tmp_path / "a.json").resolve()
    for bad in ("../escape.json", "/etc/passwd", "sub/../../x"):
        with pytest.raises(OutputPathError):
            safe_path(tmp_path, bad)
    assert safe_stem("../../etc/pass wd") == "etc_pass_wd"
    assert safe_stem("car/truck") == "car_truck" and safe_stem("car.door") == "car_door"
    assert safe_stem("...") == "image"


def test_long_names_are_cut_and_stay_distinct():
    first, second = safe_stem("red " * 120 + "car"), safe_stem("red " * 120 + "bus")
    assert len(first) == len(second) == MAX_STEM_CHARS and first != second
