"""Vision: image validation, OpenCV preprocessing, OCR / detection / classification pipelines,
analysis jobs. Models are reached only through the inference client interface."""
