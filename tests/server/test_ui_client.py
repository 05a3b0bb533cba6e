"""The web UI driven through gradio_client against a live server on 127.0.0.1."""

import httpx
from PIL import Image


def test_segment_and_reselect_through_the_ui(live_server, scene, tmp_path):
    from gradio_client import Client, handle_file

    path = tmp_path / "scene.png"
    Image.fromarray(scene).save(path)
    client = Client(live_server + "/", verbose=False)
    annotated, table, status, files, clicked = client.predict(handle_file(str(path)), "red square, blue square", 0.0, 0, "fp32", True, api_name="/segment")
    rows = table["data"]
    assert rows and rows[0][1] in ("red square", "blue square")
    annotations = annotated["value"]["annotations"]  # an update that also carries the color map
    assert len(annotations) == len(rows) and annotations[0]["label"].startswith("1. ")
    assert set(annotated["color_map"]) == {a["label"] for a in annotations}
    assert "used **fp32**" in status and "found" in clicked
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["masks.zip", "overlay.png", "result.json"]
    # Unticking "masks follow the image's edges" re-selects with bilinear masks: other areas.
    _, bilinear, _, _, _ = client.predict(0.0, 0, False, api_name="/reselect")
    assert [r[1] for r in bilinear["data"]] == [r[1] for r in rows] and [r[3] for r in bilinear["data"]] != [r[3] for r in rows]
    # Moving the threshold slider re-selects from the session's cached outputs.
    _, table, _, _, clicked = client.predict(1.0, 0, True, api_name="/reselect")
    assert table["data"] == [] and "Nothing found" in clicked


def test_rest_and_ui_share_the_process(live_server):
    assert httpx.get(f"{live_server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{live_server}/").status_code == 200
