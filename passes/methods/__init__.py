"""Calibration methods, one module each, in one registry keyed by name (``--method NAME``)."""

from .base import REGISTRY, Method, UniformConfig
from .registry import build_method, get_method

__all__ = ["REGISTRY", "Method", "UniformConfig", "build_method", "get_method"]
