"""Shared logic of glm: data formats, model, training engine, sampling, quantization. No CLI code here."""
