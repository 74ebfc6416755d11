"""General model stitching (Bansal et al. 2021; Traft & Cheney): any layer of one model into any layer
of another through an adapter (``adapters``), trained or least-squares initialised (``module``), and
stitching and CKA as similarity measures between two models' layers (``similarity``)."""
