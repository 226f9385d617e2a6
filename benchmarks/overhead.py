"""What Lightning costs per training step: one ``ECGLM``, the same batches, Lightning's step against a
hand-written PyTorch step, interleaved in one run.

The model is the tiny Llama of ``policy_cost.py`` (hidden 256, 4 layers, SmolLM2's tokenizer and
vocabulary, 28.1M parameters) with a 2-layer wav2vec2 encoder of width 64 and an MLP connector
writing 4 ECG tokens, projection-only. Batches hold 8 ECG questions.

Lightning's step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` of a real
``Trainer.fit`` (forward, backward, AdamW, scheduler, logging of ``train/loss``; no checkpointing,
no progress bar). Right after each, in the same process and on the same batch, a copy of the same
``ECGLM`` (same weights) takes a hand-written step: ``zero_grad``, forward, backward, AdamW and the
same transformers scheduler. Interleaving puts both under the same machine load. Run:

    .venv/bin/python benchmarks/overhead.py [--steps 40] [--warmup 5] [--threads 1]

Prints the median and quartiles of the per-step ratio Lightning / plain (target: median <= 1.05).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from policy_cost import save_model  # the same tiny Llama and tokenizer


def build(folder: str):
    import torch

    from ecglm.backbones import HFBackbone
    from ecglm.connectors import MLPConnector
    from ecglm.encoders import Wav2Vec2ECGEncoder
    from ecglm.module import ECGLanguageModel

    torch.manual_seed(0)
    encoder = Wav2Vec2ECGEncoder(
        conv_layers=[(64, 10, 5), (64, 5, 5)],
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        ffn_dim=128,
        dropout=0.0,
        conv_pos_kernel=16,
        conv_pos_groups=4,
    )
    backbone = HFBackbone(folder)
    return ECGLanguageModel(encoder, MLPConnector(num_tokens=4, hidden_dim=256), backbone, learning_rate=1e-5)


def batches(task, n: int) -> list[dict]:
    import numpy as np

    from ecglm.data.datamodule import QACollator
    from ecglm.data.synthetic import QUESTIONS
    from ecglm.prompts import ChatTemplate

    rng = np.random.default_rng(0)
    questions = [q for qs in QUESTIONS.values() for q in qs]
    prompt = ChatTemplate(system_prompt="You read ECGs. Answer briefly.").bind(task.backbone.tokenizer)
    collate = QACollator(prompt, task.num_ecg_tokens)
    out = []
    for b in range(n):
        items = [
            {
                "key": f"{b}-{i}_qa0",
                "ecg": rng.standard_normal((12, 2500)).astype(np.float16),
                "question": questions[(b * 8 + i) % len(questions)],
                "answer": ["normal", "sinus tachycardia", "irregular", "no"][i % 4],
                "question_type": "x",
            }
            for i in range(8)
        ]
        out.append(collate(items))
    return out


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import lightning as L
    import torch
    from transformers import get_scheduler

    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp(prefix="ecglm-overhead-")
    save_model(Path(folder))
    task = build(folder)
    plain = copy.deepcopy(task.model)  # the same ECGLM, its own parameters and optimizer
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-5)
    total = args.steps + args.warmup
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=total)
    data = batches(task, total)

    def plain_step(batch: dict) -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        plain(batch).loss.backward()
        optimizer.step()
        scheduler.step()
        return time.perf_counter() - started

    class Interleave(L.Callback):
        def __init__(self):
            self.pairs: list[tuple[float, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lightning = time.perf_counter() - self.started
            self.pairs.append((lightning, plain_step(batch)))

    timer = Interleave()
    trainer = L.Trainer(
        max_steps=total,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=folder,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(task, train_dataloaders=loader)
    pairs = timer.pairs[args.warmup :]
    ratios = sorted(lit / own for lit, own in pairs)
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    lit_ms = statistics.median(p[0] for p in pairs) * 1e3
    own_ms = statistics.median(p[1] for p in pairs) * 1e3
    print(f"steps {len(pairs)} (after {args.warmup} warm-up), threads {args.threads}, batch 8")
    print(f"Lightning step  median {lit_ms:7.1f} ms")
    print(f"plain step      median {own_ms:7.1f} ms")
    print(f"ratio Lightning/plain: median {median:.3f} (quartiles {q1:.3f} - {q3:.3f})")


if __name__ == "__main__":
    main()
