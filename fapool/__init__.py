"""FA Pool core: the Ray-free engine (model, loading, attention math, KV cache, scheduler, policy).

The names below load on first use, so that a light import (`fapool.policy`, `fapool.weights`
from the CLI's flag checks) does not wait seconds for torch.
"""
from importlib import import_module

_WHERE = {
    "PRESETS": "fapool.config",
    "EngineConfig": "fapool.config",
    "ModelConfig": "fapool.config",
    "LLMEngine": "fapool.engine",
    "PolicyConfig": "fapool.policy",
    "PoolCurve": "fapool.policy",
    "decide": "fapool.policy",
    "SamplingParams": "fapool.sampling",
    "Completion": "fapool.sequence",
    "RequestOutput": "fapool.sequence",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fapool' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
