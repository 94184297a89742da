"""Calibration methods, one module each, in one registry keyed by name (``--method NAME``)."""

from .base import REGISTRY, Method, UniformConfig, build_method, get_method
from . import apiq, billm, efficientqat, gptq, rtn  # noqa: F401,E402  (register)

__all__ = ["REGISTRY", "Method", "UniformConfig", "build_method", "get_method"]
