"""GGUF pair -> answers: llama.cpp's vision tower and decoder through llama-cpp-python (no torch)."""

from .engine import EngineError, Sampling
from .images import ImageInputError
from .model import ChatAnswer, ChatInputError, GenerationResponse, Model, load
from .scheduler import GenerationRequest, Handle, QueueFull, Scheduler, SchedulerClosed
from .video import Video, VideoInputError
from .vision import VisionError

__all__ = ["ChatAnswer", "ChatInputError", "EngineError", "GenerationRequest", "GenerationResponse", "Handle",
           "ImageInputError", "Model", "QueueFull", "Sampling", "Scheduler", "SchedulerClosed",
           "Video", "VideoInputError", "VisionError", "load"]
