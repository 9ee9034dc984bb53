"""hybridpd: disaggregated prefill/decode serving for hybrid SSM + attention models."""

from hybridpd.engine.structured import StructuredSpec
from hybridpd.request import SamplingParams

__version__ = "0.1.0"  # the one source: pyproject.toml reads it (tool.setuptools.dynamic)
__all__ = ["LLM", "SamplingParams", "StructuredSpec", "__version__"]


def __getattr__(name: str):  # lazy: importing the package must not import torch eagerly
    if name == "LLM":
        from hybridpd.engine.llm import LLM

        return LLM
    raise AttributeError(name)
