"""The UI's own logic, without a browser or a server: clicks on regions and download files."""

import os
import time

import numpy as np
import pytest

from sam3studio.server import ui
from sam3studio.server.service import Answer
from sam3studio.types import Instance, Result


def _answer() -> Answer:
    mask = np.zeros((20, 40), bool)
    mask[:, 30:] = True  # a region at the right edge only
    result = Result([Instance("red square", 0.9, (30.0, 0.0, 40.0, 20.0), mask, 0)], (20, 40), [], "tiny", "fp32", "fp32", False, {})
    return Answer(result, np.zeros((20, 40, 3), np.uint8), raw=None)


def test_a_click_names_the_region_under_it():
    assert "red square" in ui._describe_region(_answer(), "0.9,0.5,123")
    assert ui._describe_region(_answer(), "0.1,0.5") == "No region there."


@pytest.mark.parametrize("position", ["-0.05,0.5", "nan,0.5", "0.5,1.5", "x,y", ""])
def test_a_click_outside_the_image_names_nothing(position):
    assert ui._describe_region(_answer(), position) == ""


def test_downloads_are_written_and_old_ones_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(ui, "DOWNLOADS_DIR", tmp_path)
    old = tmp_path / "result-old"
    old.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    files = ui._downloads(_answer())
    assert sorted(os.path.basename(f) for f in files) == ["masks.zip", "overlay.png", "result.json"]
    assert not old.exists(), "a folder Gradio copied long ago is removed"
    assert all(os.path.exists(f) for f in files), "the fresh one stays until Gradio has copied it"


def test_a_threshold_that_keeps_too_many_masks_is_a_message_not_a_crash(tiny_checkpoint, scene, monkeypatch):
    import gradio as gr

    from sam3studio import postprocess
    from sam3studio.server.service import SegmentService, ServiceConfig

    service = SegmentService(ServiceConfig(model=str(tiny_checkpoint), precision="fp32", device="cpu"))
    service.start().join()
    answer = service.segment(scene, "red square, blue square", threshold=0.9, refine=0, precision=None, name="scene.png")
    monkeypatch.setattr(postprocess, "MAX_RESULT_MASK_BYTES", scene.shape[0] * scene.shape[1])  # room for one mask
    with pytest.raises(gr.Error, match="Raise the threshold"):
        ui._reselect(service, answer, 0.0, 0, True)
