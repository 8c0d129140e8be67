"""The inference service: FastAPI + ONNX Runtime over the artifacts in `models/`.

Never imports torch (a test checks `sys.modules` of a running app).
"""
