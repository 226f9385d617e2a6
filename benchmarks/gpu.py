"""One GPU, no network: the paper backbones' real architectures with random weights, trained and sampled.

For each backbone of the studies (Qwen3.5-9B, Qwen3.6-27B, Gemma 4 E4B, Gemma 4 31B) the text model is
built from its published ``config.json`` values (below: nothing is downloaded) with random weights, in
bf16 and in 4-bit NF4 (the bf16 model quantised on the GPU, layer by layer, as bitsandbytes does when
it loads a checkpoint), gets the recipe's LoRA adapters (QLoRA's k-bit preparation for NF4) and gradient
checkpointing, and is measured at the recipe's length and micro-batch:

- a training step (forward, backward, AdamW) under bf16 autocast: median time of the timed steps,
  tokens/s, peak memory (``torch.cuda.max_memory_allocated`` over the timed steps), and model FLOPs
  utilisation (MFU);
- generation: 32 prompts of 64 tokens answered 16 tokens each, batched (the recipes' eval_batch_size)
  against one prompt at a time.

MFU counts model FLOPs only (no recomputation, no dequantisation): with the base frozen, forward
``2 N T`` and backward through the activations ``2 N T`` (no weight gradients), plus ``6 N_lora T`` for
the adapters and ``3 A`` for attention (``A`` the forward's score and value products over the causal /
sliding-window context; linear-attention layers count their projections only). ``N``: the weights of
the decoder's linear layers; ``T``: tokens per step. A full fine-tune would be ``6 N T``. The GPU's dense
bf16 peak comes from ``PEAK_TFLOPS`` by device name (``--peak_tflops`` for another GPU; without one, MFU is
not reported).

Each model is time-boxed (``--budget_s``, smallest model first) and the whole run stops starting new work
after ``--deadline_s`` (default 450 s), so it finishes within 8 minutes; what is skipped is listed with the
reason, and a model that does not fit the GPU is reported as out of memory. Run:

    python benchmarks/gpu.py                         # one CUDA GPU: benchmarks/out/gpu.json
    python benchmarks/gpu.py --dry-run               # the plan, parameter counts and weight sizes
    python benchmarks/gpu.py --device cpu --tiny     # the whole path on shrunken configs, on CPU:
                                                     # benchmarks/out/gpu-tiny.json

The table goes to ``benchmarks/out/`` (git-ignored: figures are reported, not committed) unless ``--out``
names another file.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Published text configs (``text_config`` of each hub checkpoint's config.json), as found in public
#: mirrors of those files; the vision / audio towers are left out (the ECG replaces the image).
CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3.5-9B (Qwen3_5ForConditionalGeneration; text model qwen3_5_text).
    "qwen3.5-9b": {
        "model_type": "qwen3_5_text",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 32,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],  # x 8, expanded below
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "attn_output_gate": True,
        "vocab_size": 248320,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    },
    # Qwen/Qwen3.6-27B: its own config.json was not found offline. These are the values of the
    # Qwen3.5-27B text config (Qwen3_5ForConditionalGeneration), which third-party notes describe as
    # the same architecture class as Qwen3.6-27B; check them against the hub file before quoting.
    "qwen3.6-27b": {
        "model_type": "qwen3_5_text",
        "hidden_size": 5120,
        "intermediate_size": 17408,
        "num_hidden_layers": 64,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],  # x 16
        "num_attention_heads": 24,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 48,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "attn_output_gate": True,
        "vocab_size": 248320,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    },
    # google/gemma-4-E4B-it (Gemma4ForConditionalGeneration; text model gemma4_text, with per-layer
    # embeddings and KV sharing in its last 18 layers).
    "gemma-4-e4b": {
        "model_type": "gemma4_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 42,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],  # x 7
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_kv_shared_layers": 18,
        "hidden_size_per_layer_input": 256,
        "vocab_size_per_layer_input": 262144,
        "use_double_wide_mlp": False,
        "attention_k_eq_v": False,
        "sliding_window": 512,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "vocab_size": 262144,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    },
    # google/gemma-4-31B-it (text model gemma4_text; keys equal values in its full-attention layers).
    "gemma-4-31b": {
        "model_type": "gemma4_text",
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_hidden_layers": 60,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],  # x 10
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "num_global_key_value_heads": 4,
        "head_dim": 256,
        "global_head_dim": 512,
        "attention_k_eq_v": True,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "sliding_window": 1024,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "vocab_size": 262144,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    },
}
for _config in CONFIGS.values():  # one period of layer types above; the configs list every layer
    _period = _config["layer_types"]
    _config["layer_types"] = _period * (_config["num_hidden_layers"] // len(_period))


@dataclass(frozen=True)
class Run:
    """What the recipe ``recipes/<name>/joint-peft.yaml`` trains: micro-batch, length, adapters."""

    name: str
    seq_len: int
    batch_size: int
    r: int
    targets: tuple[str, ...]
    budget_s: float


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Smallest first, so that a short deadline still measures the most models.
RUNS = [
    Run("gemma-4-e4b", 2048, 2, 16, ATTENTION, 90),
    Run("qwen3.5-9b", 2048, 2, 16, (*ATTENTION, "gate_proj", "up_proj", "down_proj"), 100),
    Run("qwen3.6-27b", 1536, 1, 8, ATTENTION, 120),
    Run("gemma-4-31b", 1536, 1, 16, ATTENTION, 130),
]
MODES = ("bf16", "nf4")
ANSWER_TOKENS = 64
#: Where the tables go by default: git-ignored, as every benchmark output.
OUT = Path(__file__).resolve().parent / "out"
GEN_PROMPTS, GEN_PROMPT_LEN, GEN_NEW_TOKENS = 32, 64, 16

#: Dense bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "RTX 6000 Ada": 364.0,
}

#: Shrunken versions for --tiny: the same model types and layer kinds, a few thousand parameters wide.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)
TINY_EXTRA = {
    "qwen3.5-9b": dict(
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    ),
    "gemma-4-e4b": dict(
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        global_head_dim=32,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=512,
        sliding_window=16,
    ),
    "gemma-4-31b": dict(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_global_key_value_heads=2,
        global_head_dim=32,
        sliding_window=16,
    ),
}
TINY_EXTRA["qwen3.6-27b"] = TINY_EXTRA["qwen3.5-9b"]


@dataclass
class Row:
    model: str
    mode: str
    seq_len: int
    batch_size: int
    status: str = "not run"
    params: int = 0
    linear_params: int = 0
    trainable: int = 0
    weights_bytes: int = 0
    step_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    model_tflop_per_step: float | None = None
    mfu: float | None = None
    peak_bytes: int | None = None
    generate_batched_tokens_per_s: float | None = None
    generate_single_tokens_per_s: float | None = None
    build_s: float | None = None


class Deadline(Exception):
    """The model's time box or the run's deadline has passed."""


# --- building -------------------------------------------------------------------------------------


def text_config(name: str, tiny: bool):
    from transformers import AutoConfig

    values = dict(CONFIGS[name])
    if tiny:
        values.update(TINY, **TINY_EXTRA[name])
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def build(name: str, mode: str, device: str, tiny: bool):
    """The random model in bf16 (float32 on CPU), its linear layers quantised to NF4 for ``nf4``."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(text_config(name, tiny), dtype=dtype)
    if mode == "nf4":
        quantize_nf4(model, dtype)
    return model


def quantize_nf4(model, compute_dtype) -> None:
    """Replace each linear layer that 4-bit loading quantises by a bitsandbytes NF4 layer, one at a time."""
    import bitsandbytes as bnb

    from ecglm.backbones import keep_4bit_layout_on_cpu
    from ecglm.estimate import quantized_linear_names

    for name in sorted(quantized_linear_names(model)):
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
        )
        layer.weight = weight._quantize(linear.weight.device)
        if linear.bias is not None:
            layer.bias = linear.bias
        model.set_submodule(name, layer)
        del linear, weight
    model.is_loaded_in_4bit = True
    keep_4bit_layout_on_cpu(model)


class _Stand:
    """What ecglm's LoRA policy needs from a backbone: the transformers model."""

    def __init__(self, model):
        self.transformers_model = model

    def parameters(self):
        return self.transformers_model.parameters()


def adapt(model, run: Run, mode: str) -> None:
    """The recipe's policy, through ecglm's own LoRA (QLoRA's k-bit preparation for NF4)."""
    from torch import nn

    from ecglm.peft import LoRA

    policy = LoRA(
        r=run.r,
        alpha=2 * run.r,
        target_modules=list(run.targets),
        kbit=mode == "nf4",
        gradient_checkpointing=True,
    )
    stand_in = nn.Linear(1, 1, device="meta")
    policy.apply(stand_in, stand_in, _Stand(model))


# --- measuring ------------------------------------------------------------------------------------


def linear_weights(model) -> tuple[int, int]:
    """``(frozen, trainable)`` elements of the decoder's linear weights (4-bit ones unpacked)."""
    from ecglm.peft import decoder_linear_layers

    frozen = trainable = 0
    for module in decoder_linear_layers(model).values():
        for p in module.parameters(recurse=False):
            state = getattr(p, "quant_state", None)
            n = state.shape.numel() if state is not None else p.numel()
            trainable, frozen = (trainable + n, frozen) if p.requires_grad else (trainable, frozen + n)
    return frozen, trainable


def attention_flops(model, batch: int, seq: int) -> float:
    """Forward FLOPs of attention scores and values over each layer's causal (or windowed) context."""
    from ecglm.estimate import decoder_layers

    config = model.config
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    total = 0.0
    for layer, kind in zip(decoder_layers(model), kinds, strict=False):
        attention = getattr(layer, "self_attn", None)
        if attention is None or kind == "linear_attention":
            continue
        width = config.num_attention_heads * attention.head_dim
        window = seq if kind == "full_attention" else min(seq, getattr(config, "sliding_window", None) or seq)
        context = window - window * window / (2 * seq)  # mean keys attended per query
        total += 4 * batch * seq * context * width
    return total


def model_flops(model, batch: int, seq: int) -> float:
    frozen, trainable = linear_weights(model)
    tokens = batch * seq
    head = 6 * min(ANSWER_TOKENS, seq - 1) * batch * model.config.hidden_size * model.config.vocab_size
    return 4 * frozen * tokens + 6 * trainable * tokens + 3 * attention_flops(model, batch, seq) + head


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def train_steps(model, run: Run, device: str, steps: int, box: float) -> tuple[list[float], int]:
    """Warm-up step, then ``steps`` timed ones (stopped at ``box``); returns times and peak bytes."""
    import torch

    from ecglm.testing import cpu_peak_bytes

    cuda = device.startswith("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (run.batch_size, run.seq_len), device=device)
    answer = min(ANSWER_TOKENS, run.seq_len - 1)
    labels = ids[:, -answer:]
    model.train()
    # The ECG tokens need gradients whatever trains: the input embeddings require them.
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> float:
        started = time.perf_counter()
        with autocast:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=answer + 1).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    try:
        step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            if times and time.perf_counter() > box:
                break
            times.append(step())
        peak = torch.cuda.max_memory_allocated() if cuda else cpu_peak_bytes(step)
    finally:
        hook.remove()
    return times, peak


def generation(model, device: str, prompts: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Tokens/s generating for ``prompts`` prompts in one batch, and for 4 prompts one at a time."""
    import torch

    cuda = device.startswith("cuda")
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (prompts, prompt_len), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def timed(batch) -> float:
        started = time.perf_counter()
        with (
            torch.no_grad(),
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False),
        ):
            model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    timed(ids[:1])  # warm-up
    batched = prompts * new_tokens / timed(ids)
    singles = min(4, prompts)
    single = singles * new_tokens / sum(timed(ids[i : i + 1]) for i in range(singles))
    return batched, single


def measure(run: Run, mode: str, device: str, tiny: bool, steps: int, peak: float | None, box: float) -> Row:
    import torch

    row = Row(run.name, mode, run.seq_len, run.batch_size)
    started = time.perf_counter()
    model = build(run.name, mode, device, tiny)
    adapt(model, run, mode)
    row.build_s = time.perf_counter() - started
    frozen, trainable = linear_weights(model)
    row.linear_params = frozen + trainable
    row.params = sum(
        getattr(p, "quant_state", None).shape.numel()
        if getattr(p, "quant_state", None) is not None
        else p.numel()
        for p in model.parameters()
    )
    row.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if time.perf_counter() > box:
        raise Deadline("time box spent building the model")
    times, row.peak_bytes = train_steps(model, run, device, steps, box)
    row.step_times_s = times
    row.step_s = statistics.median(times)
    row.tokens_per_s = run.batch_size * run.seq_len / row.step_s
    flops = model_flops(model, run.batch_size, run.seq_len)
    row.model_tflop_per_step = flops / 1e12
    row.mfu = flops / row.step_s / (peak * 1e12) if peak else None
    if time.perf_counter() < box:
        prompts, length, new = (4, 16, 4) if tiny else (GEN_PROMPTS, GEN_PROMPT_LEN, GEN_NEW_TOKENS)
        row.generate_batched_tokens_per_s, row.generate_single_tokens_per_s = generation(
            model, device, prompts, length, new
        )
        row.status = "ok"
    else:
        row.status = "generation skipped: time box spent"
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


# --- the command ----------------------------------------------------------------------------------


def plan(tiny: bool) -> list[dict[str, Any]]:
    """Each run with its architecture's parameter count and bf16 / NF4 weight sizes (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ecglm.estimate import quantized_bytes, quantized_linear_names

    rows = []
    for run in RUNS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(text_config(run.name, tiny), dtype=torch.bfloat16)
        quantized = quantized_linear_names(model)
        params = {id(p): p for p in model.parameters()}
        linear = {id(model.get_submodule(n).weight) for n in quantized}
        nf4 = sum(
            quantized_bytes(p.numel(), True) if i in linear else 2 * p.numel() for i, p in params.items()
        )
        rows.append(
            {
                **asdict(run),
                "params": sum(p.numel() for p in params.values()),
                "bf16_gib": 2 * sum(p.numel() for p in params.values()) / 2**30,
                "nf4_gib": nf4 / 2**30,
            }
        )
    return rows


def print_plan(rows: list[dict[str, Any]]) -> None:
    print("would run, smallest first (each in bf16, then NF4; LoRA + gradient checkpointing, bf16 autocast):")
    for r in rows:
        print(
            f"  {r['name']:<12} {r['params'] / 1e9:6.2f}B params  "
            f"seq {r['seq_len']} x batch {r['batch_size']}  "
            f"LoRA r={r['r']} on {','.join(r['targets'])}  weights bf16 {r['bf16_gib']:.1f} GiB / NF4 "
            f"{r['nf4_gib']:.1f} GiB  time box {r['budget_s']:.0f} s"
        )
    print(
        f"  generation: {GEN_PROMPTS} prompts x {GEN_PROMPT_LEN} tokens -> {GEN_NEW_TOKENS} new tokens, "
        "batched and one at a time"
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| model | mode | seq x batch | params | step s | tokens/s | MFU | peak GiB | gen batched tok/s "
        "| gen batch-1 tok/s | status |",
        "|" + "---|" * 11,
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def count(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

    for r in rows:
        mfu = None if r.mfu is None else f"{100 * r.mfu:.1f}%"
        peak = None if r.peak_bytes is None else r.peak_bytes / 2**30
        cells = [
            r.model,
            r.mode,
            f"{r.seq_len} x {r.batch_size}",
            count(r.params),
            fmt(r.step_s, ".3f"),
            fmt(r.tokens_per_s, ",.0f"),
            mfu or "-",
            fmt(peak, ".2f"),
            fmt(r.generate_batched_tokens_per_s, ",.1f"),
            fmt(r.generate_single_tokens_per_s, ",.1f"),
            r.status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_out(tiny: bool) -> Path:
    """``benchmarks/out/gpu.json`` (git-ignored); a ``--tiny`` run's table is named ``gpu-tiny.json``, so it
    is never taken for the GPU's figures."""
    return OUT / ("gpu-tiny.json" if tiny else "gpu.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write the table as JSON (default: benchmarks/out/gpu.json, gpu-tiny.json with --tiny)",
    )
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (with --tiny)")
    parser.add_argument(
        "--tiny", action="store_true", help="shrunken configs: the code path, not the figures"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--models", nargs="*", default=[r.name for r in RUNS], help="subset of the models")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up")
    parser.add_argument("--deadline_s", type=float, default=450.0, help="start nothing new after this")
    parser.add_argument("--peak_tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    args = parser.parse_args(argv)

    if args.dry_run:
        print_plan(plan(args.tiny))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "no CUDA device: this benchmark measures one GPU. `--dry-run` lists what it would run; "
            "`--device cpu --tiny` runs the whole measurement path on shrunken configs.",
            file=sys.stderr,
        )
        return 2
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)  # tiny shapes: a second thread only waits (and spins) on a shared machine
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    peak = peak_tflops(device_name, args.peak_tflops) if cuda else None
    started = time.perf_counter()
    deadline = started + args.deadline_s
    rows: list[Row] = []
    for run in [r for r in RUNS if r.name in args.models]:
        if args.tiny:
            run = Run(run.name, 64, 2, 4, run.targets, run.budget_s)
        for mode in args.modes:
            box = min(deadline, time.perf_counter() + run.budget_s / len(args.modes))
            if time.perf_counter() > deadline:
                rows.append(Row(run.name, mode, run.seq_len, run.batch_size, status="skipped: run deadline"))
                continue
            try:
                rows.append(measure(run, mode, args.device, args.tiny, args.steps, peak, box))
            except Deadline as err:
                rows.append(Row(run.name, mode, run.seq_len, run.batch_size, status=f"skipped: {err}"))
            except torch.OutOfMemoryError as err:
                rows.append(
                    Row(
                        run.name,
                        mode,
                        run.seq_len,
                        run.batch_size,
                        status=f"out of memory: {str(err).splitlines()[0][:120]}",
                    )
                )
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            print(
                f"{run.name} {mode}: {rows[-1].status} ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )
    import transformers

    result = {
        "device": device_name,
        "peak_tflops": peak,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "wall_s": time.perf_counter() - started,
        "mfu_formula": "(4 N_frozen T + 6 N_lora T + 3 A + 6 answer V h) / (step_s * peak)",
        "rows": [asdict(r) for r in rows],
    }
    out = args.out or default_out(args.tiny)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{device_name}, torch {torch.__version__}, {result['wall_s']:.0f} s; table in {out}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
