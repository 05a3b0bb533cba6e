"""A live server (REST + UI, one process) on 127.0.0.1 over the tiny checkpoint."""

import socket
import threading
import time

import httpx
import pytest


@pytest.fixture(scope="session")
def live_server(tiny_checkpoint):
    import uvicorn

    from sam3studio.server.app import create_app
    from sam3studio.server.service import SegmentService, ServiceConfig
    from sam3studio.server.ui import mount_ui

    service = SegmentService(ServiceConfig(model=str(tiny_checkpoint), precision="fp32", device="cpu"))
    service.start().join()
    app = mount_ui(create_app(service), service)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=10)
