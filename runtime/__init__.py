"""GGUF pair -> answers: llama.cpp's vision tower and decoder through llama-cpp-python (no torch)."""

from .engine import EngineError, Sampling
from .images import ImageInputError
from .model import ChatAnswer, ChatInputError, GenerationResponse, Model, load
from .vision import VisionError

__all__ = ["ChatAnswer", "ChatInputError", "EngineError", "GenerationResponse", "ImageInputError", "Model", "Sampling",
           "VisionError", "load"]
