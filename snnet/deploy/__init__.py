"""Deploying a trained stitchable network: score every stitch in one pass (``evaluate``), time them
(``latency``), load a checkpoint (``load``) and export
one stitch as a standalone model (``export``)."""
