"""The inference service: FastAPI + ONNX Runtime over `models/`. Never imports torch."""
