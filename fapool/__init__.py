"""FA Pool core: the Ray-free engine (model, loading, attention math, KV cache, scheduler, policy)."""
from fapool.config import PRESETS, EngineConfig, ModelConfig
from fapool.engine import LLMEngine
from fapool.policy import PolicyConfig, PoolCurve, decide
from fapool.sampling import SamplingParams
from fapool.sequence import Completion, RequestOutput

__all__ = [
    "PRESETS",
    "Completion",
    "EngineConfig",
    "LLMEngine",
    "ModelConfig",
    "PolicyConfig",
    "PoolCurve",
    "RequestOutput",
    "SamplingParams",
    "decide",
]
