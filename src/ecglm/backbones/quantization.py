"""4-bit loading through bitsandbytes: its config, where the weights go, and what ecglm turns off.

Importing this module silences bitsandbytes' ``kernels`` lookup message (:mod:`ecglm._quiet`), before
transformers or peft import bitsandbytes.

Component layer: torch and transformers only (bitsandbytes through transformers).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from ecglm._quiet import quiet_kernels_lookup

quiet_kernels_lookup()


def bnb_4bit_config(
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype | None = None,
) -> BitsAndBytesConfig:
    """transformers' config for loading linear layers in 4 bits (``quant_type`` ``"nf4"`` or ``"fp4"``)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage else {}),
    )


def keep_4bit_layout_on_cpu(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (0.49 and later, AVX512-BF16 CPUs).

    In eval mode without gradients, ``Linear4bit`` repacks its weight in place for a bf16-only kernel,
    which (bitsandbytes 0.49-0.50) computes in bf16 whatever ``bnb_compute_dtype`` says, asserts that
    ``out_features`` is a multiple of 32 (Gemma 4's per-layer inputs and Qwen3.5's linear-attention gates
    are not), and keeps the repacked layout when training resumes: the kernel has no backward, so after
    a validation pass the input gradients of QLoRA are silently lost. The flag is read per forward.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantized_device_map() -> dict[str, Any]:
    """bitsandbytes quantises weights as they reach their device: load onto this process's GPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}
