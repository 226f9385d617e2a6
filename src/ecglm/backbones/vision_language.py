"""Vision-language backbones: a model that reads the ECG as an image with its own vision tower
(:class:`VisionLanguageBackbone`), and the families it knows.

Component layer: torch and transformers only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from ecglm.backbones.base import positions_from_mask
from ecglm.backbones.hf import HFBackbone
from ecglm.backbones.loading import DType, Quantization, resolve_model_path

#: Model types whose vision path :class:`VisionLanguageBackbone` knows, by how the image reaches the LM.
#: Qwen-VL families: image tokens by resolution, multimodal rotary positions the model computes itself.
MULTIMODAL_ROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN_FAMILIES = ("gemma3", *MULTIMODAL_ROPE_FAMILIES)  # image tokens in the sequence
CROSS_ATTENTION_FAMILIES = ("mllama",)  # one <|image|> token; the LM's cross-attention layers read it
#: Modules of these models that 4-bit loading leaves unquantised: vision towers and projectors.
VISION_MODULES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "lm_head")


class VisionLanguageBackbone(HFBackbone):
    """A vision-language model (``AutoModelForImageTextToText``) that reads the ECG as an image with its
    own vision tower and image processor: Llama 3.2 Vision (``mllama``: one ``<|image|>`` token, the
    image through cross-attention layers), Gemma 3 / MedGemma (``gemma3``: the image's
    ``mm_tokens_per_image`` soft tokens in the sequence, attending to each other both ways) and
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL (image tokens by resolution, multimodal rotary positions).

    The model's own forward and ``generate`` put the image in (as with its processor's output), so
    nothing of its vision path is re-implemented here. ecglm's prompt style writes the image's
    positions where the ``<ecg>`` marker is, framed as the model's processor frames them
    (:attr:`ecg_frame`), with :attr:`placeholder_token_id` (the image token) on each; the model
    takes no encoder or connector of ecglm's (``model.encoder`` / ``model.connector`` left out:
    :class:`~ecglm.encoders.BackbonePixels` and the ``passthrough`` connector hand it the images).

    Images are drawn at :attr:`image_size` (``data.init_args.image``) and go through the model's
    image processor (its PIL backend: torchvision is not needed). Packed rows and prefix reuse are
    not supported. 4-bit loading quantises the language model only (:data:`VISION_MODULES` stay in
    ``dtype``).

    Args:
        image_size: ``(height, width)`` the printouts are drawn at. Default: the vision tower's
            square input for Gemma 3, two tiles side by side for Llama 3.2 Vision (a printout is
            about twice as wide as high), 448 x 896 for Qwen-VL.
        Other arguments: as :class:`HFBackbone`'s (``model`` with ``random_init`` may be a
        ``model_type`` such as ``"gemma3"``, with ``config_overrides`` for its sub-configs).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        image_size: tuple[int, int] | None = None,
        dtype: DType = "float32",
        quantization: Quantization | None = None,
        bnb_double_quant: bool = True,
        bnb_compute_dtype: DType = "bfloat16",
        bnb_quant_storage: DType | None = None,
        random_init: bool = False,
        config_overrides: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__(
            model,
            tokenizer=tokenizer,
            dtype=dtype,
            quantization=quantization,
            bnb_double_quant=bnb_double_quant,
            bnb_compute_dtype=bnb_compute_dtype,
            bnb_quant_storage=bnb_quant_storage,
            random_init=random_init,
            config_overrides=config_overrides,
            trust_remote_code=trust_remote_code,
        )
        config = self.model.config
        self.family = config.model_type
        if self.family not in IMAGE_TOKEN_FAMILIES + CROSS_ATTENTION_FAMILIES:
            raise ValueError(
                f"{model!r} is a {self.family} model; VisionLanguageBackbone knows "
                f"{', '.join(IMAGE_TOKEN_FAMILIES + CROSS_ATTENTION_FAMILIES)}"
            )
        self.image_token_id = _config_value(config, "image_token_id", "image_token_index")
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = processor_chat_template(resolve_model_path(tokenizer or model))
        self.image_processor = self.load_image_processor()
        # A path, not the module: a second reference would register the tower twice in the state dict.
        self._vision_tower = min(self.vision_modules(), key=len)
        self.image_size = tuple(image_size) if image_size is not None else self._default_image_size()
        self.image_tokens_per_image = self._tokens_per_image()

    # -- loading -------------------------------------------------------------------------------------

    @property
    def auto_class(self) -> Any:
        return AutoModelForImageTextToText

    def quantization_config(self) -> BitsAndBytesConfig:
        config = super().quantization_config()
        # The vision path stays in dtype. transformers matches these from the name's start or as its
        # suffix, so each module is written as a pattern that may follow any prefix.
        config.llm_int8_skip_modules = [f".*{name}" for name in VISION_MODULES]
        return config

    def load_image_processor(self) -> Any:
        """The model's image processor (PIL backend); for random weights, the family's, from the config."""
        from transformers import AutoImageProcessor

        path = resolve_model_path(self.model_name)
        if Path(path).exists() or self.pretrained:
            try:
                return AutoImageProcessor.from_pretrained(path, backend="pil")
            except (OSError, ValueError):
                if self.pretrained:
                    raise
        vision = self.model.config.vision_config
        if self.family == "gemma3":
            from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

            side = vision.image_size
            return Gemma3ImageProcessorPil(size={"height": side, "width": side})
        if self.family == "mllama":
            from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

            side = vision.image_size
            return MllamaImageProcessorPil(
                size={"height": side, "width": side}, max_image_tiles=vision.max_num_tiles
            )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )

    def _default_image_size(self) -> tuple[int, int]:
        if self.family == "gemma3":
            side = self.model.config.vision_config.image_size
            return (side, side)
        if self.family == "mllama":
            side = self.model.config.vision_config.image_size
            return (side, 2 * side)
        return (448, 896)

    def _tokens_per_image(self) -> int:
        """Positions each image takes in the prompt: the processor's output for a blank page."""
        if self.family == "mllama":
            return 1
        if self.family == "gemma3":
            return int(self.model.config.mm_tokens_per_image)
        blank = torch.full((1, 3, *self.image_size), 255, dtype=torch.uint8)
        grid = self._processed(blank)["image_grid_thw"][0]
        return int(grid.prod()) // self.image_processor.merge_size**2

    # -- parts that policies train ---------------------------------------------------------------------

    def projector_modules(self) -> dict[str, nn.Module]:
        """``name -> module`` of the vision-to-text projection (Gemma 3's and Llama 3.2 Vision's
        ``multi_modal_projector``, Qwen-VL's patch ``merger``): what projection-only training trains."""
        names = ("multi_modal_projector", "visual.merger", "visual.deepstack_merger_list")
        return {n: m for n, m in self.model.named_modules() if n.endswith(names)}

    def vision_modules(self) -> dict[str, nn.Module]:
        """``name -> module`` of the vision tower (its projection included)."""
        names = ("vision_tower", "vision_model", "visual")
        return {n: m for n, m in self.model.named_modules() if n.endswith(names)}

    def cross_attention_modules(self) -> dict[str, nn.Module]:
        """``name -> module`` of the language model's cross-attention decoder layers (Llama 3.2 Vision's,
        with their gates); empty for models that put image tokens in the sequence."""
        if self.family not in CROSS_ATTENTION_FAMILIES:
            return {}
        layers = set(self.model.config.text_config.cross_attention_layers)
        decoder = self.model.get_decoder()
        prefix = next(name for name, module in self.model.named_modules() if module is decoder)
        return {f"{prefix}.layers.{i}": decoder.layers[i] for i in sorted(layers)}

    # -- what the data side needs ----------------------------------------------------------------------

    @property
    def placeholder_token_id(self) -> int:
        return self.image_token_id

    @property
    def ecg_frame(self) -> tuple[str, str]:
        """Text before and after an image's positions, as the model's processor writes them."""
        config = self.model.config
        token = self.tokenizer.convert_ids_to_tokens
        if self.family == "gemma3":
            return f"\n\n{token(config.boi_token_id)}", f"{token(config.eoi_token_id)}\n\n"
        if self.family in IMAGE_TOKEN_FAMILIES:
            return token(config.vision_start_token_id), token(config.vision_end_token_id)
        return "", ""

    # -- the model's inputs -----------------------------------------------------------------------------

    def _processed(self, images: Tensor) -> dict[str, Any]:
        """The image processor's output for ``(n, 3, H, W)`` images (0-255, any dtype)."""
        if tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"{self.model_name} reads ECG images of {self.image_size[0]} x {self.image_size[1]} px "
                f"(image_size), got {tuple(images.shape[2:])}: draw them at that size (data.init_args.image)"
            )
        arrays = [
            a.transpose(1, 2, 0) for a in images.detach().float().clamp(0, 255).round().byte().cpu().numpy()
        ]
        if self.family == "mllama":  # one image per row, nested as the processor takes them
            return dict(self.image_processor(images=[[a] for a in arrays], return_tensors="pt"))
        return dict(self.image_processor(images=arrays, return_tensors="pt"))

    def image_inputs(self, input_ids: Tensor, ecg_mask: Tensor, images: Tensor) -> dict[str, Any]:
        """What the model takes besides the token ids for these ``images`` (none: a text-only prompt)."""
        if not bool(ecg_mask.any()):  # a text-only prompt (its "images" are an empty placeholder)
            return {}
        device = input_ids.device
        processed = self._processed(images)
        inputs: dict[str, Any] = {"pixel_values": processed["pixel_values"].to(device, self._vision_dtype())}
        if self.family == "gemma3":
            # Gemma 3's image tokens attend to each other both ways (its token type 1).
            inputs["token_type_ids"] = ecg_mask.long()
        elif self.family == "mllama":
            from transformers.models.mllama.processing_mllama import (
                convert_sparse_cross_attention_mask_to_dense,
                get_cross_attention_token_mask,
            )

            if images.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"{self.family} takes one image per prompt here; the batch has {images.shape[0]} images "
                    f"for {input_ids.shape[0]} rows (comparison questions need an image-token model)"
                )
            sparse = [get_cross_attention_token_mask(row.tolist(), self.image_token_id) for row in input_ids]
            dense = convert_sparse_cross_attention_mask_to_dense(
                sparse,
                num_tiles=processed["num_tiles"],
                max_num_tiles=self.image_processor.max_image_tiles,
                length=input_ids.shape[1],
            )
            inputs["cross_attention_mask"] = torch.as_tensor(dense, device=device)
            inputs["aspect_ratio_ids"] = processed["aspect_ratio_ids"].to(device)
            inputs["aspect_ratio_mask"] = processed["aspect_ratio_mask"].to(device)
        else:
            inputs["image_grid_thw"] = processed["image_grid_thw"].to(device)
            if self.family == "qwen3_vl":  # its multimodal positions read which tokens are the image's
                inputs["mm_token_type_ids"] = ecg_mask.long()
        return inputs

    def _vision_dtype(self) -> torch.dtype:
        """The dtype the vision tower computes in: its first floating-point weight's (read per call, as
        a policy or Lightning's precision may cast the tower after loading)."""
        tower = self.model.get_submodule(self._vision_tower)
        return next(p.dtype for p in tower.parameters() if p.is_floating_point())

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, images: Tensor) -> dict:
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **self.image_inputs(input_ids, ecg_mask, images),
        }
        if self.family not in MULTIMODAL_ROPE_FAMILIES:
            # Left-padded rows count positions from their first real token (Qwen-VL's multimodal
            # positions are computed by the model itself from the ids, the mask and the image grid).
            inputs["position_ids"] = positions_from_mask(attention_mask)
        return inputs

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        images: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """As :meth:`HFBackbone.forward`, with the ECG ``images`` ``(n, 3, H, W)`` uint8 in the place of
        the ECG tokens: the model's own processor turns them into its ``pixel_values`` and its vision
        path reads them."""
        if position_ids is not None:
            raise ValueError(self.packing_blocker())
        inputs = {**self._inputs(input_ids, attention_mask, ecg_mask, images), "use_cache": False}
        return self._answer_forward(inputs, labels)

    def last_logits(
        self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, images: Tensor
    ) -> Tensor:
        inputs = {**self._inputs(input_ids, attention_mask, ecg_mask, images), "use_cache": False}
        return self.model(**inputs, logits_to_keep=1).logits[:, -1]

    def packing_blocker(self) -> str | None:
        return (
            f"{self.family} reads images through its own processor and positions; train it on padded "
            "batches (data.init_args.packed: false)"
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        images: Tensor,
        **generation_kwargs: Any,
    ) -> Tensor:
        inputs = self._inputs(input_ids, attention_mask, ecg_mask, images)
        inputs.pop("position_ids", None)  # generate derives them from the mask at every step
        generation_kwargs.setdefault("pad_token_id", self.pad_token_id)
        out = self.model.generate(**inputs, **generation_kwargs)
        return out[:, input_ids.shape[1] :]


def processor_chat_template(path: str) -> str | None:
    """The chat template a vision-language model's processor keeps beside the tokenizer
    (``chat_template.jinja``, or ``chat_template.json``'s ``chat_template``), where the tokenizer has none."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            found = None
        if found:
            text = Path(found).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def _config_value(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"the {config.model_type} config has none of {', '.join(names)}")
