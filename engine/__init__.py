"""NPR-Engine: parallel decoding with fork and join over a shared, refcounted KV store."""
from engine.sampler import SamplingParams


def __getattr__(name):  # LLM pulls in the model and tokenizer: import it only when asked for
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams"]
