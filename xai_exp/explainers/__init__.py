"""Explainers: CAM maps from grad-cam, LIME superpixel weights from lime (plus fast paths)."""
