"""Your own pictures: image files, tiles, export (ONNX, TorchScript) and the MLflow pyfunc model."""
