import warnings

import pytest

from sam3studio.prompts import MAX_PROMPT_CHARS, MAX_PROMPTS, PromptError, Sam3Warning, attach_boxes, fit_boxes_to_image, parse_prompts
from sam3studio.types import Prompt


def test_comma_string_splits_and_strips():
    assert [p.text for p in parse_prompts(" person,  car , blue   bag,")] == ["person", "car", "blue bag"]


def test_per_prompt_threshold_suffix_and_mapping():
    prompts = parse_prompts("dog:0.3, cat")
    assert (prompts[0].text, prompts[0].threshold, prompts[1].threshold) == ("dog", 0.3, None)
    assert parse_prompts({"dog": 0.25, "cat": None})[0].threshold == 0.25


def test_colon_numbers_that_are_not_thresholds_stay_text():
    prompts = parse_prompts("screen 16:9, 10:30 clock, dog:1")
    assert [(p.text, p.threshold) for p in prompts] == [("screen 16:9", None), ("10:30 clock", None), ("dog", 1.0)]


def test_numpy_numbers_are_accepted():
    import numpy as np

    assert parse_prompts({"dog": np.float32(0.25)})[0].threshold == 0.25


def test_list_items_stay_whole_and_duplicates_go():
    assert [p.text for p in parse_prompts(["salt, pepper shaker", "Dog", "dog"])] == ["salt, pepper shaker", "Dog"]


@pytest.mark.parametrize("bad", ["", "  ,  , ", [], [""], None])
def test_empty_prompts_are_refused(bad):
    with pytest.raises(PromptError, match="prompt"):
        parse_prompts(bad)


def test_too_many_prompts():
    with pytest.raises(PromptError, match=f"at most {MAX_PROMPTS}"):
        parse_prompts([f"thing {i}" for i in range(MAX_PROMPTS + 1)])


@pytest.mark.parametrize("bad", ["dog:1.5", "dog:-0.1"])
def test_bad_threshold(bad):
    with pytest.raises(PromptError, match="between 0 and 1"):
        parse_prompts(bad)


def test_non_string_item():
    with pytest.raises(PromptError, match="strings"):
        parse_prompts(["dog", 3])


def test_non_english_warns():
    with pytest.warns(Sam3Warning, match="English"):
        parse_prompts("红色汽车")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_prompts("a dog's red ball (small), 3 cars")


def test_boxes_attach_to_every_prompt_or_stand_alone():
    with_text = attach_boxes(parse_prompts("dog, cat"), [[1, 2, 10, 20]], [1])
    assert all(p.boxes == ((1.0, 2.0, 10.0, 20.0),) and p.box_labels == (1,) for p in with_text)
    alone = attach_boxes(parse_prompts(None, boxes_given=True), [[1, 2, 10, 20], [0, 0, 5, 5]], [1, 0])
    assert alone == [Prompt("", None, ((1.0, 2.0, 10.0, 20.0), (0.0, 0.0, 5.0, 5.0)), (1, 0))]
    assert alone[0].label == "exemplar"


def test_numpy_boxes():
    import numpy as np

    assert attach_boxes([], np.array([[1.0, 2.0, 3.0, 4.0]]))[0].boxes == ((1.0, 2.0, 3.0, 4.0),)
    assert attach_boxes(parse_prompts("dog"), np.zeros((0, 4))) == parse_prompts("dog")


@pytest.mark.parametrize("boxes,labels", [([[5, 5, 1, 1]], None), ([[0, 0, float("inf"), 4]], None), ([[1, 2, 3]], None), ([[0, 0, 4, 4]], [2]), ([[0, 0, 4, 4]], [1, 0]), ([[0, 0, 4, 4]], ["x"])])
def test_bad_boxes(boxes, labels):
    with pytest.raises(PromptError):
        attach_boxes([], boxes, labels)


@pytest.mark.parametrize("prompt", ["a" + " " * MAX_PROMPT_CHARS + "b:0.5", ["x" * (MAX_PROMPT_CHARS + 1)], {"y" * (MAX_PROMPT_CHARS + 1): 0.3}])
def test_overlong_prompt_is_refused(prompt):
    with pytest.raises(PromptError, match=f"at most {MAX_PROMPT_CHARS}"):
        parse_prompts(prompt)


def test_boxes_are_clipped_to_the_image():
    [fitted] = fit_boxes_to_image(attach_boxes(parse_prompts("dog"), [[-5, 10, 1e308, 30]]), 40, 60)
    assert fitted.boxes == ((0.0, 10.0, 60.0, 30.0),)


@pytest.mark.parametrize("box", [[70, 0, 90, 10], [0, -20, 10, -5]])
def test_box_outside_the_image_is_refused(box):
    with pytest.raises(PromptError, match="outside the 60x40 image"):
        fit_boxes_to_image(attach_boxes(parse_prompts("dog"), [box]), 40, 60)
