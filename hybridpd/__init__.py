"""hybridpd: disaggregated prefill/decode serving for hybrid SSM + attention models."""

from hybridpd.engine.structured import StructuredSpec
from hybridpd.request import SamplingParams

__all__ = ["LLM", "SamplingParams", "StructuredSpec"]


def __getattr__(name: str):  # lazy: importing the package must not import torch eagerly
    if name == "LLM":
        from hybridpd.engine.llm import LLM

        return LLM
    raise AttributeError(name)
