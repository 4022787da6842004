"""A user package whose modules import each other relatively."""
from . import stats
from .utils import clamp

__all__ = ["clamp", "stats", "VERSION"]
VERSION = "0.1"
