"""Decoding: KV cache, prefill/step/decode, samplers, hooks for methods, rollback.

    >>> from jaxvlm.generate import Engine, SamplerConfig, Hooks
"""
from jaxvlm.generate.engine import Engine, Generation, default_buckets, question_keys
from jaxvlm.generate.hooks import Hooks, StepOutputs, attention_to_image, tracked_prob
from jaxvlm.generate.samplers import SamplerConfig
from jaxvlm.generate.state import DecodeState

__all__ = ["Engine", "Generation", "default_buckets", "question_keys", "Hooks", "StepOutputs", "attention_to_image", "tracked_prob",
           "SamplerConfig", "DecodeState"]
