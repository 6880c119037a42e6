"""Storage behind an export: one small interface, two implementations."""

from .base import Backend, Extent
from .file import FileBackend
from .memory import MemoryBackend

__all__ = ["Backend", "Extent", "FileBackend", "MemoryBackend"]
