"""Grad-CAM explanations (through the grad-cam package) and overlays."""
