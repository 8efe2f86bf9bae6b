"""Serving the registered models: MLflow pyfunc models from code, request scoring, ONNX export, batch scoring."""
