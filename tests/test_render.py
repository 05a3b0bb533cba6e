import numpy as np

from sam3studio.render import annotated_sections, instance_color, overlay
from sam3studio.types import Instance, Result


def _result():
    a, b = np.zeros((60, 80), bool), np.zeros((60, 80), bool)
    a[10:30, 10:40], b[35:55, 45:75] = True, True
    instances = [Instance("red car", 0.91, (10, 10, 40, 30), a, 0), Instance("dog", 0.55, (45, 35, 75, 55), b, 1)]
    return Result(instances, (60, 80), [], "test", "fp32", "fp32")


def test_colors_are_distinct():
    colors = [instance_color(i) for i in range(12)]
    assert len(set(colors)) == 12
    for i in range(11):
        assert sum(abs(x - y) for x, y in zip(colors[i], colors[i + 1])) > 60


def test_overlay_tints_only_masked_pixels():
    image = np.full((60, 80, 3), 128, dtype=np.uint8)
    result = _result()
    drawn = overlay(image, result, edges=False, captions=False)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert not np.array_equal(drawn[20, 20], image[20, 20])
    assert np.array_equal(drawn[5, 70], image[5, 70])
    assert not np.array_equal(drawn[20, 20], drawn[45, 60]), "each instance has its own color"
    assert np.array_equal(image, np.full((60, 80, 3), 128, dtype=np.uint8)), "input untouched"


def test_edges_and_captions_draw_more():
    image = np.full((60, 80, 3), 128, dtype=np.uint8)
    plain = overlay(image, _result(), edges=False, captions=False)
    full = overlay(image, _result())
    assert (plain != full).any(axis=2).sum() > 50


def test_annotated_sections_keep_result_order():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    base, sections = annotated_sections(image, _result())
    assert base is image
    assert [label for _, label in sections] == ["1. red car 0.91", "2. dog 0.55"]
    assert sections[0][0].dtype == np.float32 and sections[0][0].max() == 1.0
