"""The server: one process with the REST API (FastAPI) and the web UI (Gradio) over one model."""
