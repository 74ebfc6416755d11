"""SN-Net and SN-Netv2: a family of pretrained anchors split into blocks, stitching layers between
them, the configuration space, per-path BatchNorm statistics, joint training (``module``) and
runtime switching (``choice``)."""
