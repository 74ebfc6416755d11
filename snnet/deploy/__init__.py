"""Deploying a trained stitchable network: score every stitch in one pass (``evaluate``), time them
(``latency``), load a checkpoint (``load``), export one stitch as a standalone model (``export``),
stitches as ONNX files checked by ONNX Runtime (``onnx``), and the whole network as a Hub-style
folder (``pretrained``)."""
