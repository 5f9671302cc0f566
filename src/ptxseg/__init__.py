"""ptxseg: pneumothorax segmentation on chest X-rays (U-Net + EfficientNet-B4)."""

__version__ = "0.1.0"
