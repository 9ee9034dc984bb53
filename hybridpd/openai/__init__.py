"""The OpenAI-compatible HTTP protocol, declared once for the instances and the P/D proxy.

Owns the pydantic request and response models (`requests.py`, `responses.py`, which also
frames SSE), validating a body into a request model with OpenAI-shaped errors and the
unknown-field warning (`parse.py`), the table of fields declared but not yet supported by the
engine (`support.py`), the mapping of a request model to `SamplingParams` keyword arguments
(`sampling.py`), the OpenAI error shape (`errors.py`) and the OpenAPI document (`schema.py`).
Knows nothing of aiohttp, tokenizers, engines or P/D routing.
"""
