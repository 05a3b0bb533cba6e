"""The REST API over the tiny checkpoint, through FastAPI's test client (real app, real model)."""

import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sam3studio.server.app import create_app
from sam3studio.server.service import SegmentService, ServiceConfig


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    service = SegmentService(ServiceConfig(model=str(tiny_checkpoint), precision="fp32", device="cpu", max_upload_bytes=2_000_000, max_pixels=4_000_000))
    service.start().join()
    assert service.ready.is_set(), service.error
    return service


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


def test_health_ready_info(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    info = client.get("/v1/info").json()
    assert info["ready"] and info["precisions"]["fp32"] == "fp32" and "torch" in info["versions"]
    assert "int8" not in info["precisions"], "an fp32 server refuses int8 requests, so it does not offer them"
    assert set(info["precisions"]) == {"fp32", "fp16", "bf16", "auto"}
    assert info["test_time_views"] == 1, "the tiny checkpoint ships no settings"


def test_not_ready_until_loaded(tmp_path):
    service = SegmentService(ServiceConfig(model=str(tmp_path / "missing")))
    service.start().join()
    client = TestClient(create_app(service))
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "failed" and "no such folder" in ready.json()["error"]
    answer = client.post("/v1/segment", files={"image": ("a.png", _png(np.zeros((8, 8, 3), np.uint8)))}, data={"prompts": "dog"})
    assert answer.status_code == 503 and answer.headers["Retry-After"]


def test_segment_returns_the_cli_document(client, scene):
    response = client.post("/v1/segment", files={"image": ("scene.png", _png(scene), "image/png")}, data={"prompts": "red square, blue square", "threshold": "0"})
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["image"] == "scene.png" and (doc["width"], doc["height"]) == (130, 90)
    assert doc["precision"] == {"requested": "fp32", "used": "fp32"} and doc["instances"]
    assert isinstance(doc["instances"][0]["segmentation"]["counts"], str)
    polygons = client.post("/v1/segment", files={"image": ("s.png", _png(scene))}, data={"prompts": "red square", "threshold": "0", "format": "polygons"})
    assert isinstance(polygons.json()["instances"][0]["segmentation"], list)
    bilinear = client.post("/v1/segment", files={"image": ("scene.png", _png(scene))},
                           data={"prompts": "red square, blue square", "threshold": "0", "snap_edges": "false"}).json()
    assert [i["area"] for i in bilinear["instances"]] != [i["area"] for i in doc["instances"]], "snap_edges=false gives other masks"


@pytest.mark.parametrize(
    "files,data,status,text",
    [
        ({"image": ("x.png", b"\x89PNG\r\n\x1a\ntruncated")}, {"prompts": "dog"}, 400, "damaged"),
        ({"image": ("x.txt", b"hello, not an image")}, {"prompts": "dog"}, 415, "not an image"),
        ({"image": ("bomb.png", None)}, {"prompts": "dog"}, 413, "over the limit"),
        ({"image": ("big.bin", b"0" * 2_100_000)}, {"prompts": "dog"}, 413, "larger than the server accepts"),
        ({"image": ("ok.png", "scene")}, {"prompts": " , "}, 400, "No prompt given"),
        ({"image": ("ok.png", "scene")}, {"prompts": "dog", "threshold": "2"}, 400, "threshold must be"),
        ({"image": ("ok.png", "scene")}, {"prompts": "dog", "threshold": "nan"}, 400, "threshold must be"),
        ({"image": ("ok.png", "scene")}, {"prompts": "dog", "precision": "fp64"}, 400, "Unknown precision"),
        ({"image": ("ok.png", "scene")}, {"prompts": "dog", "refine": "9"}, 400, "refine must be one of"),
        ({"image": ("ok.png", "scene")}, {"prompts": "dog", "format": "png"}, 400, "format must be json or polygons"),
        ({"image": ("ok.png", "scene")}, {"prompts": "dog", "threshold": "high"}, 422, "threshold"),
        ({}, {"prompts": "dog"}, 422, "image"),
    ],
)
def test_bad_input_gets_4xx_and_the_server_keeps_serving(client, scene, files, data, status, text):
    if "image" in files and files["image"][1] is None:
        files = {"image": ("bomb.png", _png(np.zeros((2500, 2000, 3), np.uint8)))}
    elif "image" in files and files["image"][1] == "scene":
        files = {"image": ("ok.png", _png(scene))}
    response = client.post("/v1/segment", files=files, data=data)
    assert response.status_code == status, response.text
    assert text in response.text and set(response.json()) == {"error", "detail"}
    assert client.get("/healthz").status_code == 200


def test_a_malformed_request_is_not_echoed_back(client):
    secret = b"private bytes of an upload " * 100
    response = client.post("/v1/segment", files={"image": ("", secret)}, data={"prompts": "dog"})
    assert response.status_code == 422 and b"private bytes" not in response.content


def test_fifty_concurrent_requests_are_all_answered(tiny_checkpoint, scene):
    service = SegmentService(ServiceConfig(model=str(tiny_checkpoint), precision="fp32", device="cpu", max_waiting=4))
    service.start().join()
    client = TestClient(create_app(service))
    statuses: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        image = np.roll(scene, i, axis=1)  # a different image each time: no cache hits
        response = client.post("/v1/segment", files={"image": ("s.png", _png(image))}, data={"prompts": "red square"})
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(statuses) == 50, "every request got an answer"
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 5


def test_chunked_upload_over_the_limit_is_413_and_under_it_works(client, scene):
    """No Content-Length (chunked transfer): the limit is enforced by reading, still as 413."""
    boundary = "sam3studio-test"

    def multipart(payload: bytes) -> bytes:
        return (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompts\"\r\n\r\nred square\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"s.png\"\r\nContent-Type: image/png\r\n\r\n"
        ).encode() + payload + f"\r\n--{boundary}--\r\n".encode()

    def chunks(body: bytes):
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    big = client.post("/v1/segment", content=chunks(multipart(b"0" * 2_100_000)), headers=headers)
    assert big.status_code == 413 and "larger than the server accepts" in big.json()["detail"]
    small = client.post("/v1/segment", content=chunks(multipart(_png(scene))), headers=headers)
    assert small.status_code == 200, small.text
    assert client.get("/healthz").status_code == 200
