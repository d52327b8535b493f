"""Tiny, randomly initialised stand-ins for the cluster models, built offline.

Each builder writes a folder that loads through the normal `from_pretrained` path, exactly like a
hub checkout, so code never branches on "tiny". Weights are random (seeded): these models exercise
the plumbing (shapes, tokenizers, vLLM, pipelines), not the medicine.

Heavy libraries are imported inside the builders so `import dermaray.models` stays cheap.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# --- A built-in corpus of dermatology / clinical-note text, for training the tokenizers. -------

_SITES = [
    "face",
    "scalp",
    "neck",
    "chest",
    "upper back",
    "lower back",
    "abdomen",
    "left forearm",
    "right forearm",
    "left upper arm",
    "right upper arm",
    "left thigh",
    "right thigh",
    "left shin",
    "right shin",
    "calf",
    "palm",
    "sole",
    "trunk",
    "shoulder",
    "cheek",
    "nose",
    "ear",
    "lip",
    "dorsal hand",
    "dorsal foot",
    "great toe nail",
    "fingernail",
    "forehead",
    "temple",
    "flank",
    "buttock",
    "groin",
    "axilla",
    "knee",
    "ankle",
    "wrist",
    "eyelid",
    "chin",
    "mucosa",
]
_DIAGNOSES = [
    "melanoma",
    "melanoma in situ",
    "basal cell carcinoma",
    "squamous cell carcinoma",
    "actinic keratosis",
    "seborrheic keratosis",
    "dermatofibroma",
    "benign nevus",
    "dysplastic nevus",
    "blue nevus",
    "Spitz nevus",
    "vascular lesion",
    "cherry angioma",
    "pyogenic granuloma",
    "solar lentigo",
    "lentigo maligna",
    "psoriasis",
    "atopic eczema",
    "contact dermatitis",
    "lichen planus",
    "keratoacanthoma",
    "Bowen disease",
    "wart",
    "molluscum contagiosum",
    "sebaceous hyperplasia",
    "epidermal cyst",
    "lipoma",
    "vitiligo",
    "rosacea",
    "tinea corporis",
    "urticaria",
    "hemangioma",
    "onychomycosis",
]
_COLORS = [
    "light brown",
    "dark brown",
    "black",
    "blue",
    "blue-gray",
    "gray",
    "red",
    "pink",
    "tan",
    "skin-colored",
    "white",
    "purple",
    "yellow",
    "variegated",
    "pearly",
    "erythematous",
]
_MORPHOLOGY = [
    "macule",
    "papule",
    "plaque",
    "nodule",
    "patch",
    "vesicle",
    "pustule",
    "ulcer",
    "erosion",
    "crusted papule",
    "scaly plaque",
    "pigmented lesion",
    "exophytic nodule",
    "flat lesion",
]
_FEATURES = [
    "an atypical pigment network",
    "a regular pigment network",
    "irregular dots and globules",
    "regular globules",
    "radial streaming",
    "pseudopods",
    "a blue-white veil",
    "regression structures",
    "arborizing vessels",
    "dotted vessels",
    "hairpin vessels",
    "milia-like cysts",
    "comedo-like openings",
    "a central white patch",
    "leaf-like areas",
    "shiny white lines",
    "structureless areas",
    "peripheral brown dots",
    "ulceration",
    "a starburst pattern",
    "a homogeneous blue pattern",
    "fingerprint-like structures",
    "rosettes",
    "scale",
    "crust",
    "a cobblestone pattern",
    "asymmetry in two axes",
]
_SYMPTOMS = [
    "itching",
    "bleeding",
    "pain",
    "tenderness",
    "burning",
    "recent growth",
    "change in color",
    "change in shape",
    "no symptoms",
    "crusting",
    "oozing",
    "scaling",
    "a non-healing sore",
]
_DURATIONS = ["2 weeks", "1 month", "3 months", "6 months", "1 year", "several years", "10 days"]
_HISTORY = [
    "melanoma",
    "basal cell carcinoma",
    "blistering sunburns",
    "tanning bed use",
    "organ transplant",
    "immunosuppression",
    "atypical moles",
    "a family history of melanoma",
    "actinic damage",
    "outdoor work",
    "no prior skin cancer",
    "radiation therapy",
]
_PLANS = [
    "excisional biopsy with 2 mm margins",
    "shave biopsy",
    "punch biopsy",
    "wide local excision",
    "Mohs surgery",
    "cryotherapy",
    "topical fluorouracil",
    "topical imiquimod",
    "sequential digital dermoscopy in 3 months",
    "total body photography",
    "reassurance",
    "follow-up in 6 months",
    "follow-up in 12 months",
    "referral to surgical oncology",
    "sentinel lymph node biopsy discussion",
    "sun protection counseling",
    "patch testing",
    "topical corticosteroid",
    "photodynamic therapy",
    "no further action",
]
_TEMPLATES = [
    "{age}-year-old {sex} presents with a {size} mm {color} {morph} on the {site}.",
    "Dermoscopy shows {feature} and {feature2}.",
    "Dermoscopic examination of the {site} lesion reveals {feature}.",
    "Assessment: {dx}. Plan: {plan}.",
    "Differential diagnosis includes {dx}, {dx2} and {dx3}.",
    "The patient reports {symptom} for {duration}.",
    "Fitzpatrick skin type {ft}. History of {hist}.",
    "Findings are consistent with {dx}; recommend {plan}.",
    "Lesion on the {site} measures {size} x {size2} mm with {border} borders.",
    "Clinical note: {color} {morph}, {border} borders, {feature}. Impression: {dx}.",
    "Pathology confirmed {dx}. Margins are {margin}.",
    "Compared with the prior image, the lesion shows {change}.",
    "ABCDE criteria: asymmetry {yn}, border {border}, color {color}, diameter {size} mm, evolving {yn}.",
]


def clinical_corpus(n_sentences: int = 1500, seed: int = 0) -> list[str]:
    """Deterministic synthetic clinical sentences (plus an alphabet line so every character is seen)."""
    rng = random.Random(seed)
    c = rng.choice
    lines = []
    for _ in range(n_sentences):
        lines.append(
            c(_TEMPLATES).format(
                age=rng.randint(18, 92),
                sex=c(["male", "female", "man", "woman", "patient"]),
                size=round(rng.uniform(1, 25), c([0, 1])),
                size2=rng.randint(1, 30),
                color=c(_COLORS),
                morph=c(_MORPHOLOGY),
                site=c(_SITES),
                feature=c(_FEATURES),
                feature2=c(_FEATURES),
                dx=c(_DIAGNOSES),
                dx2=c(_DIAGNOSES),
                dx3=c(_DIAGNOSES),
                plan=c(_PLANS),
                symptom=c(_SYMPTOMS),
                duration=c(_DURATIONS),
                ft=c(["I", "II", "III", "IV", "V", "VI"]),
                hist=c(_HISTORY),
                border=c(["regular", "irregular", "ill-defined", "well-defined"]),
                margin=c(["clear", "involved", "close"]),
                yn=c(["yes", "no"]),
                change=c(["no change", "enlargement", "new regression", "new color", "new streaks"]),
            )
        )
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    lines.append(" ".join(alphabet + alphabet.upper() + "0123456789") + " .,;:!?()[]{}'\"-+*/=%<>#&@_")
    return lines


# --- Tokenizers ------------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<image>\n{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_LM_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_lm_tokenizer(vocab_size: int = 2000, extra_special: tuple[str, ...] = ()) -> Any:
    """Byte-level BPE (Llama-like: `<s>` prepended, chat template with role tags)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _LM_SPECIALS + list(extra_special)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> in practice
    )
    tok.train_from_iterator(clinical_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Plain prompts get <s> like Llama; chat prompts carry it in the template (rendered, then
    # tokenized without special tokens by transformers and vLLM).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
        chat_template=_CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_bert_tokenizer(vocab_size: int = 1000) -> Any:
    """WordPiece, lower-cased, trained on the corpus; returned as transformers' BertTokenizer."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    # Seeding every character, alone and as a continuation, fixes their ids: otherwise the trainer
    # numbers them in hash order and breaks merge ties differently in every process. It also makes
    # unseen words split into characters instead of becoming [UNK].
    seeded = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + ch for ch in chars)]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=seeded, show_progress=False)
    tok.train_from_iterator(clinical_corpus(), trainer=trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return BertTokenizer(vocab=vocab, model_max_length=512)


def build_clip_tokenizer(vocab_size: int = 1000) -> Any:
    """CLIP-format BPE (`</w>` word ends), laid out like openai/clip: bytes, bytes</w>, merges, specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer().backend_tokenizer  # CLIP's own normalizer and pre-tokenizer
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = reference.normalizer
    tok.pre_tokenizer = reference.pre_tokenizer
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    # Seeded as in build_bert_tokenizer: fixed ids for every byte and byte</w>, so training is
    # deterministic and any text encodes without <unk>.
    seeded = byte_chars + [ch + "</w>" for ch in byte_chars]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", special_tokens=seeded, show_progress=False)
    tok.train_from_iterator(clinical_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(ch) in printable:
        return ord(ch)
    missing = [b for b in range(256) if b not in printable]
    return missing[ord(ch) - 256]


def _save_clip_vocab_files(tokenizer: Any, folder: Path) -> None:
    """Also write vocab.json + merges.txt, which older transformers' slow CLIPTokenizer reads."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# --- Builders: (out_dir, seed) -> None --------------------------------------------------------


def _tiny_llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        head_dim=32,  # not hidden/heads = 16: vLLM's CPU attention supports head sizes of 32 and up
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_note_writer(out_dir: Path, seed: int) -> None:
    """Tiny Llama causal LM + byte-level BPE tokenizer with a chat template (vLLM-loadable)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_lm_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_llama_config(tokenizer)).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_qwen2_note_writer(out_dir: Path, seed: int) -> None:
    """Tiny Qwen2 causal LM (Qwen2.5's architecture: biased q/k/v projections) + the clinical BPE
    tokenizer with a chat template: the offline stand-in of the qwen2.5-7b preset."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_lm_tokenizer()
    llama = _tiny_llama_config(tokenizer)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    config = Qwen2Config(
        **{k: getattr(llama, k) for k in keep},
        num_attention_heads=2,  # vLLM's Qwen2 takes head size = hidden / heads: 32, the least its CPU attention runs
        num_key_value_heads=1,
        max_position_embeddings=llama.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# LLaVA-1.5-7B's shapes (llava-hf/llava-1.5-7b-hf): benchmarks build random models of them offline.
LLAVA_15_VISION = {
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}
LLAVA_15_TEXT = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "vocab_size": 32064}
LLAVA_15_DECODER_LAYERS = 32


def _tiny_clip_vision_config() -> Any:
    """The tiny CLIP vision tower (64 px, 8 px patches, hidden 32, 2 layers): the tiny LLaVA's and the IP-Adapter's."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=64,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )


def build_grounding_mllm(out_dir: Path, seed: int, vision: dict[str, int] | None = None) -> None:
    """Tiny LLaVA: CLIP vision tower (64 px, 8 px patches) + projector + tiny Llama, with its processor.
    `vision`: other shapes for the tower (e.g. {"hidden_size": 64, "num_hidden_layers": 4}; a trial's variant)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_lm_tokenizer(extra_special=("<image>",))
    vision_config = _tiny_clip_vision_config()
    for key, value in (vision or {}).items():
        if not hasattr(vision_config, key) or key == "image_size":  # the processor below reads 64 px images
            raise ValueError(f"the vision tower has no setting {key!r} to change")
        setattr(vision_config, key, value)
    patch = vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_tiny_llama_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # as llava-1.5
        image_seq_length=(64 // patch) ** 2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(out_dir)
    _save_processor(out_dir, tokenizer, 64, patch, config.vision_feature_select_strategy)


def build_conv_grounding_mllm(out_dir: Path, seed: int) -> None:
    """Tiny FastVLM: a convolutional tower (a ResNet of three basic stages, 16/32/64 channels, 128 px in, an 8 x 8
    grid of 64-channel tokens out) + projector + tiny Llama, with its processor. FastVLM's own tower is a hybrid
    convolutional one (FastViTHD) whose last feature map, flattened, is the image's tokens; the tiny one is a
    ResNet for its shape. Convolutions see each pixel's neighbourhood at the tiles' own 128 px, where the tiny
    ViT's 8 px patches see blocks of a 64 px image: the shape and border attributes are read at their scale."""
    import torch
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, ResNetConfig

    tokenizer = build_lm_tokenizer(extra_special=("<image>",))
    vision_config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic", downsample_in_first_stage=False
    )
    vision_config.hidden_size = vision_config.hidden_sizes[-1]  # what FastVLM's projector reads
    side, stride = 128, 16  # the stem (a stride-2 convolution, a stride-2 pool), then two stride-2 stages
    config = FastVlmConfig(
        vision_config=vision_config,
        text_config=_tiny_llama_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(side // stride) ** 2,
    )
    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(out_dir)
    _save_processor(out_dir, tokenizer, side, stride, config.vision_feature_select_strategy)


def _save_processor(out_dir: Path, tokenizer: Any, side: int, patch: int, strategy: str) -> None:
    """The tiny MLLMs' processor: square `side` px images, one `<image>` token per `patch` px of it. With strategy
    "default" the tower's first token (a ViT's CLS) is counted and dropped; with "full" (FastVLM) every token is kept."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if strategy == "default" else 0,
        chat_template=_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)


# The pretrained tiny towers' recipe: unlabelled lesions rendered by the synthetic generator (its own random
# stream, not the lesions of any synthetic dataset), SimCLR steps; about 1.5 minutes on 2 cores for the ViT.
PRETRAIN_IMAGES = 4096
PRETRAIN_STEPS = 400
PRETRAIN_RECORD = "pretraining.json"
PRETRAIN_RECIPE = f"simclr-{PRETRAIN_IMAGES}-images-{PRETRAIN_STEPS}-steps"  # a cache built otherwise is rebuilt
CONV_PRETRAIN_RECIPE = f"resnet-16-32-64-at-128px-{PRETRAIN_RECIPE}"  # the tower's shape too (build_conv_grounding_mllm)


def build_pretrained_grounding_mllm(out_dir: Path, seed: int) -> None:
    """The tiny LLaVA with its vision tower and projector pre-trained self-supervised (SimCLR) on unlabelled
    rendered lesions: a stand-in for a general-purpose pretrained MLLM. No attribute or diagnosis is read."""
    build_grounding_mllm(out_dir, seed)
    _simclr_pretrain_tower(out_dir, seed)


def build_pretrained_conv_grounding_mllm(out_dir: Path, seed: int) -> None:
    """The tiny FastVLM with its tower and projector pre-trained as the tiny LLaVA's are (SimCLR, same images)."""
    build_conv_grounding_mllm(out_dir, seed)
    _simclr_pretrain_tower(out_dir, seed)


def _simclr_pretrain_tower(out_dir: Path, seed: int) -> None:
    """Pre-trains the vision tower and projector of the model saved at `out_dir` in place; records how."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dermaray.data.synthetic import DOMAINS, choose_diagnosis, lesion_rng, render_tile, sample_spec
    from dermaray.grounding.pretrain import simclr_pretrain
    from dermaray.grounding.vision import ImageEmbedder

    model = AutoModelForImageTextToText.from_pretrained(out_dir)
    processor = AutoProcessor.from_pretrained(out_dir).image_processor
    clinic = DOMAINS["clinic"]
    tiles = []
    for i in range(PRETRAIN_IMAGES):
        rng = lesion_rng(seed, i, "pretrain")  # the class mix only varies appearance; its name is not kept
        tiles.append(render_tile(sample_spec(rng, choose_diagnosis(rng, None), clinic), clinic.image_size, clinic, rng)[0])
    pixels = processor(images=tiles, do_normalize=False, return_tensors="np")["pixel_values"]
    config = model.config
    embedder = ImageEmbedder(
        model.model.vision_tower,
        model.model.multi_modal_projector,
        config.vision_feature_layer,
        config.vision_feature_select_strategy == "default",
    )
    with torch.random.fork_rng():  # a training worker that builds it keeps its own seeded stream
        torch.manual_seed(seed)
        history = simclr_pretrain(
            embedder,
            torch.from_numpy(pixels).float(),
            (processor.image_mean, processor.image_std),
            steps=PRETRAIN_STEPS,
            seed=seed,
        )
    model.save_pretrained(out_dir)
    record = {"method": "SimCLR", "images": PRETRAIN_IMAGES, "steps": PRETRAIN_STEPS, "loss_every_10_steps": history}
    (out_dir / PRETRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def build_image_encoder(out_dir: Path, seed: int) -> None:
    """Tiny random CLIP image encoder with projection (64 px, 8 px patches, hidden 32, 32-d embeddings): the
    offline stand-in for the CLIP ViT an IP-Adapter reads the guiding image with."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    config = _tiny_clip_vision_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)


def build_text_encoder(out_dir: Path, seed: int) -> None:
    """Tiny BERT (hidden 32, 2 layers) + WordPiece tokenizer; use with mean pooling like MiniLM."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = build_bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertModel(config).to(torch.float32).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes only tokenizer.json; vocab.txt keeps the folder readable by older readers.
    vocab = tokenizer.get_vocab()
    (out_dir / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.__getitem__)) + "\n")


# The tiny base's recipe as its preset's version records it: a cache built to another is built again.
DIFFUSION_ATTENTION_HEADS = 2
DIFFUSION_BASE_RECIPE = f"unet-32-64-{DIFFUSION_ATTENTION_HEADS}-heads"


def build_diffusion_base(out_dir: Path, seed: int) -> None:
    """Tiny Stable Diffusion 1.x pipeline: 64 px images, 32 px latents (VAE factor 2)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        # diffusers reads this as the number of heads: 2 heads of 16 channels. With 8 (4 channels each) CPU flash
        # attention took 62% of a training step, and a step 2x as long, for the same weights.
        attention_head_dim=DIFFUSION_ATTENTION_HEADS,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(  # two blocks: one downsampling, so 64 px -> 32 latent
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(  # SD-1.5's noise schedule
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _save_clip_vocab_files(tokenizer, out_dir / "tokenizer")
