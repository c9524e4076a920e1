"""An independent rendition of the official MiniCPM-V processor for tests: slice geometry from transformers'
MiniCPMV4_6ImageProcessorPil (the published LLaVA-UHD algorithm in code; patch_size 3.5 with its 4-fold merge
gives the resampler families' 14-pixel alignment), the published placeholder text (`<image_id>N</image_id>`,
`<image>` + query_num `<unk>` + `</image>`, slices row by row; 2.5 wraps its slices in `<slice>`), the chat
template rendered by transformers, and ids from the published tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tokenizers import Tokenizer
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

REFERENCE = MiniCPMV4_6ImageProcessorPil()
HALF_PATCH = 3.5  # x4 merge = 14-pixel alignment
MARKER = "(<image>./</image>)"
# The conversations the layout and parity tests run, each over two images.
CHATS = {
    "single image": lambda a, b: [{"role": "user", "content": [a, "What is in the image?"]}],
    "sliced image": lambda a, b: [{"role": "user", "content": [b, "Read the document."]}],
    "two images": lambda a, b: [{"role": "user", "content": [a, b, "Compare them."]}],
    "two turns": lambda a, b: [{"role": "user", "content": [a, "Describe it."]},
                               {"role": "assistant", "content": "A picture."},
                               {"role": "user", "content": [b, "And this one?"]}],
    "few-shot": lambda a, b: [{"role": "user", "content": [a, "Label?"]}, {"role": "assistant", "content": "cat"},
                              {"role": "user", "content": [b, "Label?"]}],
}


class CountingVision:
    """The model's VisionPipeline for layout only: its real `layout`, and for each piece as many (empty)
    embedding rows as the merger makes of it (checked against transformers in the features test)."""

    def __init__(self, vision) -> None:  # noqa: ANN001
        self.vision = vision

    def layout(self, size, max_slice_nums, small_image_upsize="always", image=None):  # noqa: ANN001, ANN201
        return self.vision.layout(size, max_slice_nums, small_image_upsize, image=image)

    def embeddings(self, key, piece):  # noqa: ANN001, ANN201
        image = piece()
        rows = image.width * image.height // self.vision.piece_align ** 2
        return np.zeros((rows, 1), np.float32), 0.0

    def keep_only(self, protected) -> None:  # noqa: ANN001
        pass


def published_processor_class(processor_class: type) -> type:
    """A published transformers processor unchanged but for its constructor's class check of the video
    processor, which transformers resolves through a registry that needs torchvision (not installed here;
    the tests use images only)."""
    return type(f"Published{processor_class.__name__}", (processor_class,),
                {"check_argument_for_proper_class": lambda self, argument_name, argument: None})


def transformers_reference(folder: Path):  # noqa: ANN201 - a transformers PreTrainedModel
    """transformers' own model class of a checkpoint (config.json's `architectures`), in float32, eval mode."""
    import torch
    import transformers

    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32).eval()


def image_ids(items: list, image_token_id: int) -> list[int]:
    """The runtime's prompt items with each image-embedding row shown as the processor's image placeholder."""
    return [item if isinstance(item, int) else image_token_id for item in items]


def one_image_prompt(tokenizer: Any, question: str) -> str:
    """The chat template around one image placeholder and `question`, as a transformers processor expects."""
    return tokenizer.apply_chat_template([{"role": "user", "content": f"{tokenizer.image_token}\n{question}"}],
                                         tokenize=False, add_generation_prompt=True, enable_thinking=False)


def assert_piece_features_match(encode: Callable[[Image.Image], np.ndarray], reference: Any, pixels: Any,
                                 pieces: list[Image.Image], mode: str, case: str) -> None:
    """Our vision tower's embeddings of `pieces` (`encode`) against transformers' `get_image_features` of the
    published processor's `pixels`: the same piece sizes, and per-token cosine >= 0.999."""
    import torch

    assert [[p.height // 14, p.width // 14] for p in pieces] == pixels["target_sizes"].tolist(), case
    with torch.no_grad():
        expected = reference.model.get_image_features(pixels["pixel_values"], pixels["target_sizes"],
                                                      downsample_mode=mode).pooler_output
    for piece, want in zip(pieces, expected):
        ours, want = encode(piece), want.float().numpy()
        assert ours.shape == want.shape, case
        cosine = (ours * want).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cosine.min() >= 0.999, (case, float(cosine.min()))


def follow_up_turn(model: Any, image_size: tuple[int, int], question: str) -> tuple[list, list[int], list]:
    """A first turn (8 greedy tokens), then a follow-up with a new image on the cached conversation: (the
    follow-up messages, its 8 greedy tokens, its prompt items), the tokens checked equal to a fresh model's."""
    from minicpmv_edge.runtime import load

    first = [{"role": "user", "content": [random_image((500, 400), 4), question]}]
    answer = model.chat(first, max_new_tokens=8, sampling=False)
    follow_up = first + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": [random_image(image_size, 5), "And this one?"]}]
    reused = [r.token for r in model.stream_generate(follow_up, max_new_tokens=8)]
    result = model.conversion
    with load(result.llm_path, result.mmproj_path) as fresh:
        assert reused == [r.token for r in fresh.stream_generate(follow_up, max_new_tokens=8)]
        items, _ = fresh.prepare(follow_up)
    return follow_up, reused, items


def message_images(msgs: list[dict[str, Any]]) -> list[Image.Image]:
    return [part for message in msgs for part in message["content"] if not isinstance(part, str)]


def assert_layout_matches(model: Any, published: Any, sizes: dict[str, tuple[int, int]], question: str,
                          **options: Any) -> None:
    """Our prompt items for one image (laid out only: CountingVision) equal the published processor's ids, for
    every size and max_slice_nums 1, 4, 9, 16; `options` go to our prompt builder (small_image_upsize)."""
    vision = CountingVision(model.vision)
    tokenizer = published.tokenizer
    prompt = one_image_prompt(tokenizer, question)
    for name, size in sizes.items():
        image = random_image(size, 1)
        for max_slice_nums in (1, 4, 9, 16):
            items, _ = model.prompt.build([{"role": "user", "content": [image, question]}], vision,
                                          max_slice_nums=max_slice_nums, **options)
            expected = published(text=[prompt], images=[image], max_slice_nums=max_slice_nums, return_tensors="np")
            assert image_ids(items, tokenizer.image_token_id) == expected["input_ids"][0].tolist(), \
                (name, max_slice_nums)


def image_prompt(model: Any, image_token_id: int, image: Image.Image, question: str) -> tuple[list, list, Any]:
    """(messages, our prompt items, the ids as transformers takes them) of one image and a question."""
    import torch

    msgs = [{"role": "user", "content": [image, question]}]
    items, _ = model.prepare(msgs)
    return msgs, items, torch.tensor([image_ids(items, image_token_id)])


def reference_geometry(size: tuple[int, int], max_slice_nums: int) -> tuple[tuple, tuple | None, tuple | None]:
    """(overview (w, h), grid (cols, rows), slice (w, h)) from transformers' implementation."""
    width, height = size
    grid = REFERENCE.get_sliced_grid((height, width), max_slice_nums, 448)
    oh, ow = REFERENCE.find_best_resize((height, width), 448, HALF_PATCH, "16x", allow_upscale=grid is None)
    if grid is None:
        return (int(ow), int(oh)), None, None
    rh, rw = REFERENCE.get_refine_size((height, width), grid, 448, HALF_PATCH, "16x", allow_upscale=True)
    rows, cols = grid
    return (int(ow), int(oh)), (cols, rows), (int(rw) // cols, int(rh) // rows)


def reference_pieces(image: Image.Image, max_slice_nums: int) -> list[Image.Image]:
    """Overview, then slices row by row, resized with bicubic as the published processor does."""
    overview, grid, slice_size = reference_geometry(image.size, max_slice_nums)
    pieces = [image.resize(overview, Image.Resampling.BICUBIC)]
    if grid is not None:
        cols, rows = grid
        refined = image.resize((slice_size[0] * cols, slice_size[1] * rows), Image.Resampling.BICUBIC)
        pieces += [refined.crop((c * slice_size[0], r * slice_size[1], (c + 1) * slice_size[0], (r + 1) * slice_size[1]))
                   for r in range(rows) for c in range(cols)]
    return pieces


def random_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def official_placeholder(size: tuple[int, int], index: int, preprocessor: dict, family: str,
                         max_slice_nums: int) -> str:
    unk = preprocessor["unk"] * preprocessor["image_feature_size"]
    text = f"{preprocessor['im_start']}{unk}{preprocessor['im_end']}"
    if preprocessor.get("use_image_id"):
        text = f"{preprocessor['im_id_start']}{index}{preprocessor['im_id_end']}" + text
    _, grid, _ = reference_geometry(size, max_slice_nums)
    if grid is None:
        return text
    cols, rows = grid
    if family == "minicpm-llama3-v-2.5":
        piece = f"{preprocessor['im_start']}{unk}{preprocessor['im_end']}"
        return text + preprocessor["slice_start"] + "\n".join([piece * cols] * rows) + preprocessor["slice_end"]
    piece = f"{preprocessor['slice_start']}{unk}{preprocessor['slice_end']}"
    return text + "\n".join([piece * cols] * rows)


def official_prompt_ids(folder: Path, family: str, msgs: list[dict[str, Any]], hf_tokenizer: Callable,
                        max_slice_nums: int) -> tuple[list[int], int, list[Image.Image]]:
    """Token ids the official processor builds for `msgs` (images as `<unk>` runs), the `<unk>` id, and the
    images in prompt order."""
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    images: list[Image.Image] = []
    texts = []
    for message in msgs:
        content = message["content"] if isinstance(message["content"], list) else [message["content"]]
        images += [part for part in content if not isinstance(part, str)]
        texts.append({"role": message["role"],
                      "content": "\n".join(p if isinstance(p, str) else MARKER for p in content)})
    text = hf_tokenizer(folder).apply_chat_template(texts, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=False)
    for index, image in enumerate(images):
        text = text.replace(MARKER, official_placeholder(image.size, index, preprocessor, family, max_slice_nums), 1)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids, tokenizer.token_to_id(preprocessor["unk"]), images
