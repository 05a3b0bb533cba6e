import numpy as np

from sam3studio.train.data import PromptTarget, TrainingSample
from sam3studio.train.probes import _objects_named


def _mask(*cells: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((4, 4), np.float32)
    for y, x in cells:
        mask[y, x] = 1.0
    return mask


def test_objects_are_named_by_the_majority_of_their_pixels_last_words():
    names = ["", "red circle", "blue circle", "blue star"]
    last = np.array(["", "circle", "circle", "star"])
    first_circle, second_circle, star = _mask((0, 0), (0, 1), (0, 2)), _mask((3, 0), (3, 1)), _mask((1, 3), (2, 3), (3, 3))
    named = np.array([[2, 2, 3, 0],  # first circle: two pixels named a circle (another color still counts), one a star
                      [0, 0, 0, 1],  # star: two of three pixels named a circle
                      [0, 0, 0, 2],
                      [3, 3, 0, 3]])  # second circle: both pixels named a star
    sample = TrainingSample(np.zeros((3, 8, 8), np.float32), [
        PromptTarget("red circle", np.stack([first_circle, second_circle]), np.zeros((2, 4), np.float32)),
        PromptTarget("star", star[None], np.zeros((1, 4), np.float32)),  # not a category name: the same star again, not counted
        PromptTarget("blue star", star[None], np.zeros((1, 4), np.float32)),
        PromptTarget("green square", np.zeros((0, 4, 4), np.float32), np.zeros((0, 4), np.float32)),  # absent
    ], np.zeros((4, 4), np.int64))
    assert _objects_named(sample, named, names, last) == [(3, True), (2, False), (3, False)]
