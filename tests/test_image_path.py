"""The image-ECG path: printouts drawn in the collator, image encoders (the LLaVA composition with any
text LLM), vision-language backbones (Gemma 3, Qwen2.5-VL, Llama 3.2 Vision) with their own vision
towers and processors, their PEFT policies, and image-only shards with bad images."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ecglm.data.collate import QACollator
from ecglm.encoders import CNNImageEncoder, HFVisionEncoder, ViTImageEncoder
from ecglm.model import ECGLM
from ecglm.peft import LoRA, PartialFineTuning, ProjectionOnly
from ecglm.render import ECGPrintout, PrintoutAugment, save_png
from ecglm.testing.tiny import bound_prompt, tiny_backbone, tiny_vision_backbone

FAMILIES = ("gemma3", "qwen2_5_vl", "qwen3_vl", "mllama")


def qa_items(n: int, seed: int = 0, question: str = "What is the rhythm?") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "key": f"rec{i}_qa0",
            "ecg": (rng.standard_normal((12, 2500)).cumsum(1) * 0.02).astype(np.float16),
            "question": question + " Answer briefly." * i,  # rows of different lengths
            "answer": "sinus rhythm" if i % 2 else "atrial fibrillation",
            "question_type": "single-query",
            "dataset": "ecgqa-ptbxl",
            "epoch": 0,
        }
        for i in range(n)
    ]


# --- printouts in the loader ---------------------------------------------------------------------------


def test_collator_draws_each_ecg_as_the_model_sees_it_and_distorts_training_batches_per_epoch():
    backbone = tiny_backbone()
    prompt = bound_prompt(backbone)
    view = ECGPrintout(size=(96, 192), augment=PrintoutAugment(), fs=250, mv_per_unit=1.0)
    items = qa_items(3)
    train = QACollator(prompt, 2, images=view)
    batch = train(items)
    assert batch.ecg.shape == (3, 3, 96, 192) and batch.ecg.dtype == torch.uint8
    assert torch.equal(train(items).ecg, batch.ecg)  # same key and epoch: the same picture
    later = train([{**it, "epoch": 1} for it in items]).ecg
    assert not torch.equal(later, batch.ecg)  # a new distortion each epoch
    clean = QACollator(prompt, 2, for_generation=True, images=view)(items).ecg
    undistorted = torch.from_numpy(np.stack([ECGPrintout(size=(96, 192), fs=250)(it)[0] for it in items]))
    assert torch.equal(clean, undistorted)  # evaluation reads clean printouts
    assert not torch.equal(clean, batch.ecg)
    # A dark trace on white paper: most pixels are paper, some are ink.
    assert (batch.ecg.float().mean() > 180) and (clean.min() < 60)
    assert view.blank().shape == (3, 96, 192) and int(view.blank().min()) == 255


def test_comparison_questions_get_one_image_per_ecg():
    backbone = tiny_backbone()
    prompt = bound_prompt(backbone)
    items = qa_items(2)
    items[1]["ecg"] = np.stack([items[0]["ecg"], items[1]["ecg"]])
    batch = QACollator(prompt, 2, images=ECGPrintout(size=(64, 128), fs=250))(items)
    assert batch.ecg.shape == (3, 3, 64, 128) and batch.ecg_counts.tolist() == [1, 2]
    assert int(batch.ecg_mask.sum()) == 3 * 2


# --- image encoders + any text LLM (the LLaVA composition) --------------------------------------------


@pytest.mark.parametrize(
    "encoder",
    [
        lambda: CNNImageEncoder(image_size=(64, 128), channels=(8, 16, 32)),
        lambda: ViTImageEncoder(image_size=(64, 128), patch_size=16, embed_dim=32, num_layers=1, ffn_dim=64),
        lambda: HFVisionEncoder(
            "siglip_vision_model",
            image_size=(64, 128),
            random_init=True,
            config_overrides=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=64,
                patch_size=16,
            ),
        ),
    ],
    ids=["cnn", "vit", "siglip"],
)
def test_image_encoder_connector_and_text_llm_train_on_printouts(encoder):
    from ecglm.connectors import MLPConnector

    torch.manual_seed(0)
    enc = encoder()
    model = ECGLM(enc, MLPConnector(num_tokens=2), tiny_backbone(), ProjectionOnly(train_encoder=True))
    assert model.image_size == (64, 128)
    prompt = bound_prompt(model.backbone)
    collate = QACollator(prompt, model.num_ecg_tokens, images=ECGPrintout(size=model.image_size, fs=250))
    batch = collate(qa_items(3))
    frames = enc(batch.ecg)
    assert frames.shape[0] == 3 and frames.shape[2] == enc.output_dim
    out = model(batch)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == trainable and any(n.startswith("encoder.") for n in grads)
    assert not any(n.startswith("backbone.") for n in trainable)
    # The blank-page control: white paper, not black.
    assert torch.equal(model.blank_ecg(batch.ecg), torch.full_like(batch.ecg, 255))
    with pytest.raises(ValueError, match=r"\(batch, 3, 64, 128\)"):
        enc(torch.zeros((1, 3, 32, 32), dtype=torch.uint8))


def test_a_signal_model_refuses_a_data_side_that_draws_images():
    from ecglm.data.datamodule import ECGQADataModule

    data = ECGQADataModule(image=ECGPrintout())
    with pytest.raises(ValueError, match="model reads signals"):
        data.attach(bound_prompt(tiny_backbone()), 1)
    with pytest.raises(ValueError, match=r"data\.init_args\.image"):
        ECGQADataModule().attach(bound_prompt(tiny_backbone()), 1, image_size=(64, 128))


# --- vision-language backbones ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm():
    cache: dict[str, object] = {}

    def make(family: str, policy=None) -> ECGLM:
        return ECGLM(None, None, tiny_vision_backbone(family), policy)

    return lambda family, policy=None: (
        make(family, policy) if policy else cache.setdefault(family, make(family))
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_language_backbone_trains_and_generates_batched_as_one_by_one(family, vlm):
    model = vlm(family)
    backbone = model.backbone
    prompt = bound_prompt(backbone)
    view = ECGPrintout(size=model.image_size, fs=250)
    items = qa_items(3)
    batch = QACollator(prompt, model.num_ecg_tokens, images=view)(items)
    # The image's positions hold the model's image token, framed as its processor frames them.
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    image = [i for i, t in enumerate(row) if t == backbone.image_token_id]
    assert len(image) == backbone.image_tokens_per_image == model.num_ecg_tokens
    before, after = backbone.ecg_frame
    if before:
        tok = backbone.tokenizer
        assert tok.decode(row[image[0] - 1]) in before and tok.decode(row[image[-1] + 1]) in after
    model.train()
    with torch.enable_grad():
        loss = model(batch).loss
    assert torch.isfinite(loss)

    model.eval()
    generation = QACollator(prompt, model.num_ecg_tokens, for_generation=True, images=view)
    batched = model.generate(generation(items), max_new_tokens=5)
    one_by_one = [model.generate(generation([it]), max_new_tokens=5)[0] for it in items]
    assert batched == one_by_one
    # The image reaches the answer: a blank page or no image changes the next-token distribution.
    g = generation(items)
    fields, images = model.condition_inputs(g, "ecg")
    real = backbone.last_logits(fields.input_ids, fields.attention_mask, fields.ecg_mask, images)
    fields, blank = model.condition_inputs(g, "zeroed_ecg")
    white = backbone.last_logits(fields.input_ids, fields.attention_mask, fields.ecg_mask, blank)
    assert (real - white).abs().max() > 1e-4
    # ... and so do two different ECGs' printouts under the same question (not only a blank page).
    two = generation([{**it, "question": items[0]["question"]} for it in qa_items(2, seed=1)])
    assert torch.equal(two.input_ids[0], two.input_ids[1]) and not torch.equal(two.ecg[0], two.ecg[1])
    fields, images = model.condition_inputs(two, "ecg")
    logits = backbone.last_logits(fields.input_ids, fields.attention_mask, fields.ecg_mask, images)
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    assert len(model.generate(g, condition="text_only", max_new_tokens=3)) == 3
    with pytest.raises(ValueError, match="random_encoder"):
        model.generate(g, condition="random_encoder")


def test_gemma3_prompt_places_the_image_as_its_processor_does(vlm):
    """Gemma 3's processor writes ``\\n\\n<start_of_image>`` + soft tokens + ``<end_of_image>\\n\\n``
    where the chat text has ``<start_of_image>``; ecglm's prompt gives the same ids around the image."""
    model = vlm("gemma3")
    backbone = model.backbone
    tok = backbone.tokenizer
    ids = bound_prompt(backbone).encode("Rate?", None, model.num_ecg_tokens).input_ids
    k = backbone.image_tokens_per_image
    expected = tok(
        f"\n\n<start_of_image>{'<image_soft_token>' * k}<end_of_image>\n\n", add_special_tokens=False
    )
    text = tok.decode(ids)
    assert tok.decode(expected["input_ids"]) in text


CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
#: Each family's image processor as its published checkpoint's ``preprocessor_config.json`` sets it
#: (google/gemma-3-4b-it, Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct,
#: meta-llama/Llama-3.2-11B-Vision-Instruct), with the square tile sizes (896, 560 px) scaled to the tiny
#: towers' (64, 56 px): (module, PIL-backend class, settings).
PUBLISHED_PROCESSORS = {
    "gemma3": ("gemma3.image_processing_pil_gemma3", "Gemma3ImageProcessorPil", {
        "image_processor_type": "Gemma3ImageProcessor", "size": {"height": 64, "width": 64}, "resample": 2,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }),
    "qwen2_5_vl": ("qwen2_vl.image_processing_pil_qwen2_vl", "Qwen2VLImageProcessorPil", {
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
    }),
    "qwen3_vl": ("qwen2_vl.image_processing_pil_qwen2_vl", "Qwen2VLImageProcessorPil", {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }),
    "mllama": ("mllama.image_processing_pil_mllama", "MllamaImageProcessorPil", {
        "image_processor_type": "MllamaImageProcessor", "size": {"height": 56, "width": 56},
        "max_image_tiles": 4,
        "resample": 2, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_pad": True, "do_convert_rgb": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
    }),
}  # fmt: skip
#: Printout sizes that no tiny tower reads as they are (not its square, not multiples of the Qwen patches).
ODD_SIZES = {"gemma3": (48, 100), "qwen2_5_vl": (50, 110), "qwen3_vl": (70, 150), "mllama": (70, 150)}


@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_are_the_published_image_processor_s_at_a_size_the_tower_does_not_read(family, tmp_path):
    """A model folder as a hub download holds it, with the family's published image-processor settings:
    the pixel values (and Qwen-VL's patch grid, Llama's tiles) the model gets for a printout drawn at an
    odd size are those of an image processor this test builds from the same settings, given the printout
    as a PIL image; and each image takes as many prompt positions as that processor's grid gives."""
    import importlib

    from PIL import Image

    from ecglm.backbones import VisionLanguageBackbone
    from ecglm.testing import saved_vision_model

    module, name, settings = PUBLISHED_PROCESSORS[family]
    folder = Path(saved_vision_model(tmp_path / family, family))
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    backbone = VisionLanguageBackbone(str(folder), image_size=ODD_SIZES[family])
    item = qa_items(1)[0]
    batch = QACollator(
        bound_prompt(backbone),
        backbone.image_tokens_per_image,
        for_generation=True,
        images=ECGPrintout(size=ODD_SIZES[family], fs=250),
    )([item])
    ours = backbone.image_inputs(batch.input_ids, batch.ecg_mask, batch.ecg)

    reference_processor = getattr(importlib.import_module(f"transformers.models.{module}"), name)(
        **{k: v for k, v in settings.items() if k != "image_processor_type"}
    )
    picture = Image.fromarray(batch.ecg[0].permute(1, 2, 0).numpy())
    assert picture.size == ODD_SIZES[family][::-1]
    reference = reference_processor(
        images=[[picture]] if family == "mllama" else [picture], return_tensors="pt"
    )
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"])
    if family.startswith("qwen"):
        assert torch.equal(ours["image_grid_thw"], reference["image_grid_thw"])
        assert backbone.image_tokens_per_image == int(reference["image_grid_thw"].prod()) // 4  # 2x2 merged
    elif family == "mllama":
        for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
            assert torch.equal(ours[key], reference[key]), key
        assert reference["num_tiles"][0][0] > 1  # an odd size: resized and padded onto several tiles
    else:
        assert ours["pixel_values"].shape == (1, 3, 64, 64)
    assert ours["pixel_values"].abs().max() < 3  # normalised, not raw 0-255


def trained(model: ECGLM, batch) -> set[str]:
    model.zero_grad()
    model.train()
    with torch.enable_grad():
        model(batch).loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("family", FAMILIES)
def test_policies_train_exactly_their_parts_of_a_vision_language_model(family, vlm):
    base = vlm(family)
    prompt = bound_prompt(base.backbone)
    batch = QACollator(prompt, base.num_ecg_tokens, images=ECGPrintout(size=base.image_size, fs=250))(
        qa_items(2)
    )
    projector = tuple(f"backbone.model.{n}." for n in base.backbone.projector_modules())
    assert projector

    def requires_grad(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    # Projection-only: the model's own vision-to-text projector, nothing else.
    model = vlm(family, ProjectionOnly())
    grads = trained(model, batch)
    assert grads and requires_grad(model) == {n for n in requires_grad(model) if n.startswith(projector)}
    assert grads <= requires_grad(model)

    # LoRA on every linear layer of the language model; the vision tower frozen, never lm_head.
    model = vlm(family, LoRA(r=2, target_modules="all-linear", dropout=0.0))
    trainable = requires_grad(model)
    adapters = {n for n in trainable if ".lora_" in n}
    towers = tuple(f"backbone.model.{n}." for n in model.backbone.vision_modules())
    assert adapters and not any(n.startswith(towers) for n in adapters)
    assert trainable - adapters == {n for n in trainable if n.startswith(projector)}
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    grads = trained(model, batch)
    assert grads <= trainable and any(".lora_B" in n for n in grads)

    # LoRA on the vision tower too (the studies' "all linear layers").
    model = vlm(family, LoRA(r=2, target_modules="all-linear", dropout=0.0, vision_tower=True))
    vision_adapters = {n for n in requires_grad(model) if ".lora_" in n and n.startswith(towers)}
    assert vision_adapters and not any(n.startswith(projector) for n in vision_adapters)

    # The Llama study's "partial" baseline: projector + cross-attention layers in full.
    if family == "mllama":
        model = vlm(family, PartialFineTuning())
        trainable = requires_grad(model)
        layers = model.backbone.cross_attention_modules()
        assert {n for n in trainable if not n.startswith(projector)} == {
            f"backbone.model.{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters()
        }
        grads = trained(model, batch)
        assert grads <= trainable and any("cross_attn_attn_gate" in n for n in grads)
    else:
        with pytest.raises(ValueError, match="no cross-attention layers"):
            vlm(family, PartialFineTuning())


def test_vision_language_backbone_refuses_an_encoder_of_its_own():
    backbone = tiny_vision_backbone("gemma3")
    with pytest.raises(ValueError, match="own vision tower"):
        ECGLM(CNNImageEncoder(image_size=(64, 64)), None, backbone)
    with pytest.raises(ValueError, match="give an encoder and a connector"):
        ECGLM(None, None, tiny_backbone())


# --- image-only shards (ECGInstruct) and bad images -------------------------------------------------------


def _png(size=(128, 256), mode="RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size[::-1], "white").save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_shard(path: Path, samples: list[tuple[str, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image in samples:
            meta = json.dumps({"qa": [{"question": "Rhythm?", "answer": "sinus"}], "dataset": "ecg-instruct"})
            members = [("json", meta.encode())] + ([("image.png", image)] if image is not None else [])
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_image_only_shards_stream_and_bad_images_are_skipped_with_shard_and_key(tmp_path, caplog):
    from webdataset.tariterators import tarfile_samples

    from ecglm.data.stream import BadInput, BadSampleError, CheckedQA

    good = _png()
    shard = tmp_path / "images-000000.tar"
    write_image_shard(
        shard,
        [
            ("a", good),
            ("b", good[: len(good) // 2]),  # truncated
            ("c", b"not an image"),
            ("d", _png((16, 16))),  # too small to be a printout
            ("e", _png(mode="L")),  # grey: converted
        ],
    )
    import webdataset as wds

    from ecglm.data.stream import Segment, ShardInfo

    def read(strict: bool):
        bad = BadInput({str(shard): 5}, strict=strict)
        checked = CheckedQA(bad)
        samples = tarfile_samples(iter([{"url": str(shard)}]), handler=bad)
        info = ShardInfo(str(shard), "ecg-instruct", 5, 5)
        return list(checked.segment(wds.decode(handler=bad)(samples), Segment(info, 0, 5))), bad

    with caplog.at_level("WARNING", logger="ecglm.data"):
        items, bad = read(strict=False)
    assert [it["key"] for it in items] == ["a_qa0", "e_qa0"]
    assert items[0]["image"].shape == (128, 256, 3) and items[1]["image"].dtype == np.uint8
    assert bad.counts == {"unreadable image": 2, "wrong image size": 1}
    assert "images-000000.tar" in caplog.text and "key b: unreadable image" in caplog.text
    with pytest.raises(BadSampleError, match="unreadable image"):
        read(strict=True)
    # The collator resizes a shipped image to the model's size, as it would draw a printout.
    batch = QACollator(bound_prompt(tiny_backbone()), 1, images=ECGPrintout(size=(64, 128)))(items)
    assert batch.ecg.shape == (2, 3, 64, 128) and int(batch.ecg.min()) == 255


def test_ecg_instruct_llava_json_and_images_become_shards_the_loader_reads(tmp_path):
    """ECGInstruct as published (a LLaVA-style JSON list and image files) into image shards: a missing
    and a corrupt image are skipped and counted with the item named (or raise under strict); the
    DataModule streams the rest as the same typed batch the printouts make."""
    from ecglm.data.datamodule import ECGQADataModule
    from ecglm.data.ecg_instruct import ECGInstructImages

    root = tmp_path / "images"
    (root / "ptb-xl").mkdir(parents=True)
    items = []
    for i in range(6):
        name = f"ptb-xl/{i:05d}_hr-0.png"
        if i != 4:  # item 4's image is missing
            (root / name).write_bytes(_png() if i != 5 else _png()[:100])  # item 5's is corrupt
        turns = [
            {"from": "human", "value": "<image>\nWhat is the rhythm?"},
            {"from": "gpt", "value": "sinus"},
        ]
        if i == 0:
            turns += [{"from": "human", "value": "And the axis?"}, {"from": "gpt", "value": "normal"}]
        items.append({"id": f"item.{i}", "image": name, "conversations": turns})
    (tmp_path / "ECGInstruct.json").write_text(json.dumps(items))
    builder = ECGInstructImages(
        str(tmp_path / "ECGInstruct.json"), str(root), val_fraction=0.3, test_fraction=0.3, seed=1
    )
    manifest = builder.build(tmp_path / "shards")
    assert manifest["skipped"] == {"missing image": 1, "unreadable image": 1}
    assert sum(manifest["splits"][s]["num_qa"] for s in ("train", "val", "test")) == 4
    assert builder.is_built(tmp_path / "shards")
    with pytest.raises(ValueError, match=r"item 4 \(id 'item.4'\): missing image: .*00004_hr-0.png"):
        ECGInstructImages(str(tmp_path / "ECGInstruct.json"), str(root), strict=True).build(tmp_path / "s2")

    backbone = tiny_backbone()
    with pytest.raises(ValueError, match=r"holds ECG pictures, not signals: set data\.init_args\.image"):
        ECGQADataModule(str(tmp_path / "shards")).setup("fit")
    data = ECGQADataModule(
        str(tmp_path / "shards"), batch_size=1, eval_batch_size=8, image=ECGPrintout(), verify_checksums=True
    )
    data.attach(bound_prompt(backbone), 2, image_size=(64, 128))
    data.setup("fit")
    batches = [b for split in ("train", "val", "test") for b in data._loader(split, 8, False, False)]
    keys = sorted(k for b in batches for k in b.key)
    assert keys == ["item_0_qa0", "item_1_qa0", "item_2_qa0", "item_3_qa0"]
    assert all(b.ecg.shape[1:] == (3, 64, 128) and b.ecg.dtype == torch.uint8 for b in batches)


# --- evaluation as the image studies report it ---------------------------------------------------------


def test_label_scores_are_each_label_s_answer_likelihood_and_give_the_macro_auc():
    """Each label's score is the mean log-probability of the label written as the whole answer: the
    negative teacher-forced loss of that answer, row by row; the label-set metrics turn the scores
    into a macro-AUC beside macro-F1 and Hamming loss."""
    from ecglm.connectors import MLPConnector
    from ecglm.metrics.label_sets import LabelSetMetrics

    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = ECGLM(CNNImageEncoder(image_size=(64, 128), channels=(8, 16)), MLPConnector(), backbone)
    model.prompt = bound_prompt(backbone)
    model.eval()
    view = ECGPrintout(size=(64, 128), fs=250)
    items = qa_items(3)
    labels = ["atrial fibrillation", "sinus rhythm", "left axis deviation"]
    batch = QACollator(model.prompt, model.num_ecg_tokens, for_generation=True, images=view)(items)
    scores = model.label_scores(batch, labels)
    assert scores.shape == (3, 3)
    teacher = QACollator(model.prompt, model.num_ecg_tokens, images=view)
    with torch.no_grad():
        for r, item in enumerate(items):
            for j, label in enumerate(labels):
                loss = model(teacher([{**item, "answer": label}])).loss
                assert scores[r, j].item() == pytest.approx(-loss.item(), abs=1e-4)
    metric = LabelSetMetrics(labels)
    metric.update(
        ["sinus rhythm", "sinus rhythm", "atrial fibrillation"], [it["answer"] for it in items], scores
    )
    result = metric.compute()
    assert set(result) >= {"macro_f1", "hamming_loss", "auc"} and 0 <= result["auc"] <= 1


def test_reports_of_the_signal_and_image_paths_side_by_side(tmp_path):
    from ecglm.commands import main

    def report(acc: float, blank: float) -> dict:
        def entry(value: float) -> dict:
            return {"datasets": {"ecgqa-ptbxl": {"acc": {"mean": value, "std": 0.01}}}}

        return {"summary": {"conditions": {"ecg": entry(acc), "zeroed_ecg": entry(blank)}}}

    for name, values in {"signal": (0.71, 0.30), "image": (0.64, 0.31)}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report(*values)))
    out = tmp_path / "compare.md"
    code = main(
        ["compare", "--report", f"signal={tmp_path / 'signal.json'}", "--report",
         f"image={tmp_path / 'image.json'}", "--out", str(out), "--metrics", "acc"]
    )  # fmt: skip
    assert code == 0
    text = out.read_text()
    assert "| signal: `ecg` | signal: `zeroed_ecg` | image: `ecg` | image: `zeroed_ecg` |" in text
    assert "| ecgqa-ptbxl | ACC | 71.0 ± 1.0 | 30.0 ± 1.0 | 64.0 ± 1.0 | 31.0 ± 1.0 |" in text
    assert main(["compare", "--report", f"x={tmp_path / 'missing.json'}", "--out", str(out)]) == 2


@pytest.mark.parametrize("family", ["gemma3", "mllama"])
def test_4bit_vision_language_model_quantises_the_language_model_only_and_trains_qlora(family, tmp_path):
    import bitsandbytes as bnb

    from ecglm.backbones import VisionLanguageBackbone
    from ecglm.testing.tiny import saved_vision_model

    folder = saved_vision_model(tmp_path / family, family)
    backbone = VisionLanguageBackbone(
        folder,
        quantization="nf4",
        bnb_compute_dtype="float32",
        image_size=(56, 112) if family == "mllama" else None,
    )
    quantized = {n for n, m in backbone.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    towers = tuple(backbone.vision_modules()) + tuple(backbone.projector_modules())
    assert quantized and not any(n.startswith(towers) for n in quantized)
    assert any(
        n.startswith(towers) for n, m in backbone.model.named_modules() if isinstance(m, torch.nn.Linear)
    )
    model = ECGLM(None, None, backbone, LoRA(r=2, target_modules="all-linear", kbit=True, dropout=0.0))
    prompt = bound_prompt(backbone)
    batch = QACollator(prompt, model.num_ecg_tokens, images=ECGPrintout(size=model.image_size, fs=250))(
        qa_items(2)
    )
    grads = trained(model, batch)
    assert any(".lora_B" in n for n in grads) and all(
        ".lora_" in n or n.startswith(tuple(f"backbone.model.{p}" for p in backbone.projector_modules()))
        for n in grads
    )
    model.eval()
    generation = QACollator(
        prompt, model.num_ecg_tokens, for_generation=True, images=ECGPrintout(size=model.image_size, fs=250)
    )
    assert len(model.generate(generation(qa_items(2)), max_new_tokens=3)) == 2


# --- bundles and answers on ECG files ---------------------------------------------------------------------


LEADS12 = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def test_image_models_export_and_answer_a_record_as_before(tmp_path):
    """A bundle of an image model records how its ECGs are drawn; loaded without the recipe it draws a
    raw record the same way and gives the same answers, for an image encoder + text LLM and for a
    vision-language model with LoRA on its language model."""
    from ecglm.bundle import GROUPS
    from ecglm.inference import answer, answer_image
    from ecglm.plugins import build_component
    from ecglm.testing.tiny import saved_causal_lm, saved_vision_model, tokenizer_dir

    def build(spec: dict, part: str):
        return build_component(spec, GROUPS[part])

    rng = np.random.default_rng(1)
    signal = rng.standard_normal((12, 5000)).cumsum(1) * 0.01  # 10 s at 500 Hz, mV
    printout = ECGPrintout(dpi=40, mv_per_unit=0.3)
    llm = saved_causal_lm(tmp_path / "llm", tokenizer_dir())
    vlm = saved_vision_model(tmp_path / "vlm", "gemma3")

    def spec(class_path: str, **init_args) -> dict:
        return {"class_path": class_path, "init_args": init_args}

    cases = {
        "cnn": {
            "encoder": spec("ecglm.encoders.CNNImageEncoder", image_size=[64, 128], channels=[8, 16]),
            "connector": spec("ecglm.connectors.MLPConnector", num_tokens=2),
            "backbone": spec("ecglm.backbones.HFBackbone", model=llm),
            "policy": spec("ecglm.peft.ProjectionOnly", train_encoder=True),
        },
        "gemma3": {
            "backbone": spec("ecglm.backbones.VisionLanguageBackbone", model=vlm),
            "policy": spec("ecglm.peft.LoRA", r=2, target_modules="all-linear", dropout=0.0),
        },
    }
    for name, components in cases.items():
        torch.manual_seed(0)
        parts = [
            build(components[p], p) if p in components else None for p in ("encoder", "connector", "backbone")
        ]
        model = ECGLM(*parts, build(components["policy"], "policy"))
        with torch.no_grad():  # trained adapters: the bundle must carry them
            for n, param in model.named_parameters():
                if "lora_B" in n:
                    param.normal_(0, 0.5)
        model.prompt = bound_prompt(model.backbone)
        model.printout = printout
        model.eval()
        questions = ["Rate?", "Rhythm?"]
        before = answer(model, signal, 500, LEADS12, questions)
        bundle = tmp_path / f"bundle-{name}"
        model.save_pretrained(
            bundle, components=components, prompt={"class_path": "ecglm.prompts.ChatTemplate"}
        )
        # The base models are local folders, which only the user may name (not the bundle).
        base = {"backbone": {"model": components["backbone"]["init_args"]["model"]}}
        loaded = ECGLM.from_pretrained(bundle, overrides=base)
        assert loaded.printout == replace(printout, augment=None)
        assert loaded.image_size == model.image_size
        assert answer(loaded, signal, 500, LEADS12, questions) == before

    # A picture as a dataset ships it: `ecglm ask --image` answers what answer_image answers, and
    # the printout the model would draw itself gets the same answer as drawing it from the signal.
    from ecglm.commands import main
    from ecglm.inference import preprocessing_of
    from ecglm.records import Recording, prepare

    window = prepare(Recording(signal.T, LEADS12, 500.0, "signal"), preprocessing_of(loaded), "first")[0]
    drawn = replace(printout, fs=250.0)({"key": "x", "ecg": window})[0].transpose(1, 2, 0)
    png = tmp_path / "ecg.png"
    save_png(drawn, png)
    assert answer_image(loaded, png, questions) == before
    out = tmp_path / "answers.jsonl"
    ask = ["ask", "--model", str(bundle), "--max_new_tokens", "16", "--question", "Rate?"]
    ask += ["--override", f"backbone.model={vlm}"]
    assert main([*ask, "--image", str(png), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["answer"] == before[0]
    (tmp_path / "broken.png").write_bytes(png.read_bytes()[:200])
    assert main([*ask, "--image", str(tmp_path / "broken.png")]) == 2
    from ecglm.connectors import MLPConnector
    from ecglm.testing.tiny import tiny_encoder

    signal_model = ECGLM(tiny_encoder(), MLPConnector(), tiny_backbone())
    signal_model.prompt = bound_prompt(signal_model.backbone)
    with pytest.raises(ValueError, match="reads ECG signals, not pictures"):
        answer_image(signal_model, png, "Rate?")


def test_image_quickstart_recipe_draws_trains_and_checkpoints_through_the_cli(tmp_path, monkeypatch):
    """recipes/image-quickstart.yaml through ``ecglm fit`` (a tiny LLM in SmolLM2's place): printouts
    drawn in the loader worker at the CNN's size, a few steps, a checkpoint with the CNN's weights."""
    from ecglm.commands.lightning import run_cli
    from ecglm.testing.tiny import saved_causal_lm, tokenizer_dir
    from ecglm_testing import REPO

    monkeypatch.chdir(tmp_path)
    llm = saved_causal_lm(tmp_path / "llm", tokenizer_dir())
    cli = run_cli(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / "image-quickstart.yaml"),
            f"--model.backbone.init_args.model={llm}",
            "--model.backbone.init_args.gguf_file=null",
            "--data.init_args.builder.init_args.num_train=8",
            "--data.init_args.builder.init_args.num_val=2",
            "--data.init_args.builder.init_args.num_test=2",
            "--data.init_args.batch_size=4",
            "--trainer.max_steps=2",
            "--model.val_generation_samples=0",
            f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    assert cli.trainer.global_step == 2
    image = cli.datamodule.image
    assert image.size == (128, 256) and image.fs == 250.0 and image.augment is not None
    ckpt = torch.load(tmp_path / "runs/image-quickstart/checkpoints/last.ckpt", weights_only=False)
    assert any(k.startswith("encoder.stages.") for k in ckpt["state_dict"])
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])


def test_estimate_says_it_does_not_model_vision_language_backbones():
    from ecglm.estimate import EstimateError, build_meta_parts

    backbone = {
        "class_path": "ecglm.backbones.VisionLanguageBackbone",
        "init_args": {"model": "google/medgemma-4b-it"},
    }
    with pytest.raises(EstimateError, match=r"vision-language backbone .* is not modelled yet"):
        build_meta_parts({"encoder": None, "connector": None, "backbone": backbone})


@pytest.mark.parametrize("family", ["gemma3", "mllama"])
def test_bf16_vision_language_model_reads_bf16_pixels_and_trains_float32_adapters(family):
    backbone = tiny_vision_backbone(family, dtype="bfloat16")
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    model = ECGLM(None, None, backbone, LoRA(r=2, target_modules="all-linear", dropout=0.0))
    # Adapters and the projector (trained in full) keep float32 weights in the bf16 model.
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    projector = [p for m in backbone.projector_modules().values() for p in m.parameters()]
    assert projector and all(p.requires_grad and p.dtype == torch.float32 for p in projector)
    view = ECGPrintout(size=model.image_size, fs=250)
    prompt = bound_prompt(backbone)
    batch = QACollator(prompt, model.num_ecg_tokens, images=view)(qa_items(2))
    pixels = backbone.image_inputs(batch.input_ids, batch.ecg_mask, batch.ecg)["pixel_values"]
    assert pixels.dtype == torch.bfloat16
    grads = trained(model, batch)
    assert any(".lora_B" in n for n in grads)
    model.eval()
    assert len(model.generate(QACollator(prompt, model.num_ecg_tokens, True, images=view)(qa_items(2)))) == 2
    if family == "mllama":  # the partial baseline in bf16: cross-attention layers trained in float32
        partial = ECGLM(None, None, tiny_vision_backbone(family, dtype="bfloat16"), PartialFineTuning())
        assert {p.dtype for p in partial.parameters() if p.requires_grad} == {torch.float32}
        assert any("cross_attn" in n for n in trained(partial, batch))


def test_a_chat_template_kept_by_the_processor_is_found(tmp_path):
    """Some vision-language repositories keep the chat template beside the processor
    (``chat_template.json``), not in the tokenizer's files: the backbone reads it from there."""
    from transformers import AutoTokenizer

    from ecglm.backbones import VisionLanguageBackbone
    from ecglm.testing.tiny import CHATML_TEMPLATE, saved_vision_model

    folder = Path(saved_vision_model(tmp_path / "vlm", "gemma3"))
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        path = folder / name
        if path.exists() and name.endswith(".json"):
            config = json.loads(path.read_text())
            config.pop("chat_template", None)
            path.write_text(json.dumps(config))
        elif path.exists():
            path.unlink()
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    backbone = VisionLanguageBackbone(str(folder))
    assert backbone.tokenizer.chat_template == CHATML_TEMPLATE
    assert bound_prompt(backbone).encode("Rate?", "normal", backbone.image_tokens_per_image).labels
