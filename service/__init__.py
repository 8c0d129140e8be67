"""The inference service: FastAPI + ONNX Runtime over the artifacts in `models/`. Never imports torch."""
