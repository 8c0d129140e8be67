"""Offline package: RCE training, calibration of the thresholding test, ONNX export, evaluation.

Imports torch; the service never imports this package.
"""
