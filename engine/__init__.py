"""loraserve's engine: model, unified page pool, scheduler, runner and the engine loop.

The public entry points are :class:`engine.llm_engine.LLMEngine` (add_request / step / abort)
and :class:`engine.llm.LLM` (blocking ``generate``).
"""

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CacheConfig",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "TokenLogprob",
]
