"""Per-token cost of structured output: filling the grammar's token mask (llguidance, CPU),
advancing the matcher, and applying the masks to a batch of logits (one torch op).

Walks each schema's grammar to completion with seeded random allowed tokens (so every step is
a real mid-grammar state) and reports µs per token. Two vocabularies: the demo tokenizer (384
ids) and a synthetic byte-level one of `--vocab` ids (real tokenizers are not shipped
offline; mask cost grows with vocabulary size and with how many tokens a state allows).

    python bench/structured_masks.py [--vocab 131072] [--device cuda] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hybridpd.engine.sampler import AllowedTokens, apply_token_masks
from hybridpd.engine.structured import StructuredOutputs, StructuredSpec

SCHEMAS = {
    "flat object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
        "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"],
        "additionalProperties": False},
    "nested + array": {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "tag": {
            "enum": ["alpha", "beta", "gamma"]}}, "required": ["id", "tag"],
        "additionalProperties": False}, "maxItems": 8}}, "required": ["items"],
        "additionalProperties": False},
    "any json object": None,
}


def synthetic_model_dir(vocab: int, seed: int = 0) -> str:
    """A directory with a byte-level BPE tokenizer.json of `vocab` ids: the 256 bytes, then
    random word-like pieces (letters, digits, punctuation, optional leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from hybridpd.demo.tokenizer_files import byte_to_unicode

    alphabet = byte_to_unicode()
    rng = random.Random(seed)
    chars = "etaoinshrdlucmfwypvbgkjqxz" * 3 + "ETAOINSHRDLU0123456789" + '{}[]":,._-'
    pieces = {alphabet[b]: b for b in range(256)}
    while len(pieces) < vocab:
        word = ("Ġ" if rng.random() < 0.5 else "") + "".join(
            rng.choice(chars) for _ in range(rng.randint(2, 9)))
        pieces.setdefault(word, len(pieces))
    tok = Tokenizer(models.BPE(vocab=pieces, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    d = Path(tempfile.mkdtemp(prefix="structured-bench-"))
    tok.save(str(d / "tokenizer.json"))
    return str(d)


def walk(so: StructuredOutputs, spec: StructuredSpec, steps: int, seed: int) -> tuple:
    """Fill + consume per token along one seeded random walk; returns (fill µs, consume µs,
    allowed tokens per step, tokens walked)."""
    rng = random.Random(seed)
    m = so.matcher(spec)
    fills, consumes, allowed = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        masks = so.token_masks([("r", m)])
        t1 = time.perf_counter()
        assert masks is not None
        bits = masks.bits[0]
        ok = ((bits[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
        ids = ok[: so.vocab_size].nonzero().flatten().tolist()
        ids = [i for i in ids if i not in so.eos_token_ids] or ids
        t2 = time.perf_counter()
        m.consume(rng.choice(ids))
        t3 = time.perf_counter()
        fills.append((t1 - t0) * 1e6)
        consumes.append((t3 - t2) * 1e6)
        allowed.append(len(ids))
        if m.library_matcher.is_stopped():
            break
    return fills, consumes, allowed


def argmax_cost(vocab: int, batch: int, device: str, repeats: int = 50) -> float:
    """The sampler's own floor (a greedy argmax over the same block), for scale."""
    logits = torch.randn(batch, vocab, device=device)
    logits.argmax(dim=-1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        logits.argmax(dim=-1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e6


def apply_cost(vocab: int, batch: int, device: str, repeats: int = 50) -> float:
    logits = torch.randn(batch, vocab, device=device)
    bits = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int32)
    allowed = AllowedTokens(tuple(range(batch)), bits)
    for _ in range(3):
        apply_token_masks(logits, allowed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        apply_token_masks(logits, allowed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=131072, help="synthetic vocabulary size")
    ap.add_argument("--steps", type=int, default=200, help="tokens walked per schema")
    ap.add_argument("--device", default="cpu", help="where the masks are applied")
    a = ap.parse_args()
    from hybridpd.demo.embedded import embedded_model_dir

    vocabs = {"demo (384)": (embedded_model_dir(), 384),
              f"synthetic ({a.vocab})": (synthetic_model_dir(a.vocab), a.vocab)}
    print(f"{'vocabulary':<20} {'schema':<16} {'compile ms':>10} {'fill µs/tok':>12} "
          f"{'p90':>8} {'consume µs':>10} {'allowed':>8} {'tokens':>6}")
    for vname, (model_dir, vocab) in vocabs.items():
        so = StructuredOutputs(model_dir, vocab, [0])
        t0 = time.perf_counter()
        so.token_masks([])  # nothing to fill: builds nothing
        so._library_tokenizer()
        print(f"{vname:<20} tokenizer view built in {(time.perf_counter() - t0) * 1e3:.0f} ms")
        for sname, schema in SCHEMAS.items():
            spec = (StructuredSpec.json_object() if schema is None
                    else StructuredSpec.json_schema(json.dumps(schema)))
            t0 = time.perf_counter()
            so.matcher(spec)
            compile_ms = (time.perf_counter() - t0) * 1e3
            fills, consumes, allowed = walk(so, spec, a.steps, seed=1)
            fills_sorted = sorted(fills)
            print(f"{vname:<20} {sname:<16} {compile_ms:>10.1f} "
                  f"{statistics.median(fills):>12.1f} "
                  f"{fills_sorted[int(0.9 * (len(fills) - 1))]:>8.1f} "
                  f"{statistics.median(consumes):>10.1f} {statistics.median(allowed):>8.0f} "
                  f"{len(fills):>6}")
    print(f"\napply (one masked op for the batch) on {a.device}:")
    for vocab in (384, a.vocab):
        for batch in (1, 8, 64):
            reps = 50 if vocab * batch < 2**20 else 5
            print(f"  vocab {vocab:>7} batch {batch:>3}: "
                  f"{apply_cost(vocab, batch, a.device, reps):10.1f} µs/step "
                  f"(argmax of the same block: {argmax_cost(vocab, batch, a.device, reps):.1f})")


if __name__ == "__main__":
    main()
