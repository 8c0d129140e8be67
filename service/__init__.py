"""The inference service: FastAPI + ONNX Runtime over `models/`. Never imports torch.

A test checks `sys.modules` of a running app for torch.
"""
