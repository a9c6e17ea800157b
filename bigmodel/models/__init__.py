"""Backbones (timm, features_only), task heads and the multi-task model."""
