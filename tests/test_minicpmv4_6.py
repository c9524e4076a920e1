"""MiniCPM-V 4.6 end to end against transformers' own implementation (`transformers.models.minicpmv4_6`) on the
same tiny synthetic weights, in both downsample modes.

Stated tolerances:
- image features: per-token cosine >= 0.999 between clip.cpp (F16 mmproj) and the transformers model's vision
  path, for every piece of a small, a wide, a tall and a large image (measured: >= 0.9999997);
- logits of an image + text prompt (F32 GGUF): the same argmax at every position and |difference| < 0.01
  (measured 3e-4; llama.cpp keeps the KV cache in F16);
- greedy generation: the same 32 tokens;
- token layout: identical ids to the published `MiniCPMV4_6Processor` for four image shapes and four
  `max_slice_nums` values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from official import (assert_piece_features_match, image_ids, image_prompt, one_image_prompt,
                      published_processor_class, random_image)
from test_convert import assert_clean_failure, broken_copy, edit_config, run_cli

from minicpmv_edge.convert import convert_checkpoint
from minicpmv_edge.runtime import EngineError, load

transformers = pytest.importorskip("transformers")
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (  # noqa: E402
    MiniCPMV4_6ImageProcessorPil,
)
from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor  # noqa: E402
from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor  # noqa: E402

FAMILY = "minicpm-v-4.6"
MODES = ("16x", "4x")
SIZES = {"small": (300, 200), "wide": (1200, 400), "tall": (400, 1100), "large": (1500, 1300)}
QUESTION = "Describe the picture."


PublishedProcessor = published_processor_class(MiniCPMV4_6Processor)


@pytest.fixture(scope="module")
def converted46(checkpoint: Path, workdir: Path):  # noqa: ANN201
    done = {}

    def get(mode: str, preset: str):  # noqa: ANN202
        if (mode, preset) not in done:
            done[mode, preset] = convert_checkpoint(checkpoint, workdir / "46" / f"{preset}-{mode}", preset,
                                                    downsample_mode=mode)
        return done[mode, preset]

    return get


@pytest.fixture(scope="module")
def runtime(converted46):  # noqa: ANN001, ANN201
    loaded = {}

    def get(mode: str, preset: str):  # noqa: ANN202
        if (mode, preset) not in loaded:
            result = converted46(mode, preset)
            loaded[mode, preset] = load(result.llm_path, result.mmproj_path)
        return loaded[mode, preset]

    yield get
    for model in loaded.values():
        model.close()


def processor(checkpoint: Path, mode: str) -> PublishedProcessor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    images = MiniCPMV4_6ImageProcessorPil.from_pretrained(checkpoint, downsample_mode=mode)
    return PublishedProcessor(image_processor=images, video_processor=MiniCPMV4_6VideoProcessor(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def llamacpp_runtime(llamacpp_pair):  # noqa: ANN001, ANN201
    """The pair llama.cpp's own `convert_hf_to_gguf.py` (and `--mmproj`, 16x) makes of the same checkpoint."""
    pair = llamacpp_pair("minicpm-v-4.6")
    with load(pair.model, pair.mmproj) as model:
        yield model


@pytest.mark.parametrize(("mode", "source"), [("16x", "ours"), ("4x", "ours"), ("16x", "llama.cpp")])
def test_layout_matches_published_processor(mode: str, source: str, checkpoint: Path, runtime,  # noqa: ANN001
                                            request: pytest.FixtureRequest) -> None:
    model = runtime(mode, "f16") if source == "ours" else request.getfixturevalue("llamacpp_runtime")
    published = processor(checkpoint, mode)
    tokenizer = published.tokenizer
    prompt = one_image_prompt(tokenizer, QUESTION)
    for name, size in SIZES.items():
        image = random_image(size, 1)
        for max_slice_nums in (1, 4, 9, 16):
            items, _ = model.prepare([{"role": "user", "content": [image, QUESTION]}], max_slice_nums=max_slice_nums)
            expected = published(text=[prompt], images=[image], max_slice_nums=max_slice_nums, return_tensors="np")
            assert image_ids(items, tokenizer.image_token_id) == expected["input_ids"][0].tolist(), (name, max_slice_nums)


@pytest.mark.parametrize("mode", MODES)
def test_image_features_match_transformers(mode: str, checkpoint: Path, reference, runtime) -> None:  # noqa: ANN001
    from minicpmv_edge.runtime.slicing import cut, plan_slices

    model = runtime(mode, "f16")
    images = MiniCPMV4_6ImageProcessorPil.from_pretrained(checkpoint, downsample_mode=mode)
    for name, size in SIZES.items():
        image = random_image(size, 2)
        pixels = images(image, return_tensors="pt")
        pieces = cut(image, plan_slices(image.size, 9, model.vision.piece_align))
        assert_piece_features_match(model.vision.encoder.encode, reference, pixels, pieces, mode, name)


@pytest.mark.parametrize("mode", MODES)
def test_logits_and_greedy_generation_match_transformers(mode: str, checkpoint: Path, reference,
                                                         runtime) -> None:  # noqa: ANN001
    model = runtime(mode, "f32")
    image = random_image((700, 500), 3)
    msgs, items, ids = image_prompt(model, reference.config.image_token_id, image, QUESTION)
    pixels = MiniCPMV4_6ImageProcessorPil.from_pretrained(checkpoint, downsample_mode=mode)(image, return_tensors="pt")
    inputs = dict(pixel_values=pixels["pixel_values"], target_sizes=pixels["target_sizes"], downsample_mode=mode)
    with torch.no_grad():
        expected = reference(input_ids=ids, **inputs).logits[0].float().numpy()
        expected_tokens = reference.generate(input_ids=ids, **inputs, max_new_tokens=32, do_sample=False)[0]

    ours = model.prompt_logits(items)[:, : expected.shape[1]]
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
    assert np.abs(ours - expected).max() < 0.01
    tokens = [record.token for record in model.stream_generate(msgs, max_new_tokens=32)]
    # transformers' greedy run stops after 32 tokens or at (and including) an end token: ours must be all of it
    assert tokens == expected_tokens[ids.shape[1]:].tolist()


def test_follow_up_turn_equals_a_fresh_model(runtime, converted46) -> None:  # noqa: ANN001
    """Qwen3.5's recurrent state cannot be rewound, so a prompt that diverges from the cached history is decoded
    again from the start; the answer must be what a fresh model gives."""
    model = runtime("16x", "f32")
    image = random_image((500, 400), 4)
    first = [{"role": "user", "content": [image, QUESTION]}]
    answer = model.chat(first, max_new_tokens=8).text
    follow_up = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the colours?"}]
    reused = [r.token for r in model.stream_generate(follow_up, max_new_tokens=8)]
    other = [{"role": "user", "content": [image, "Something else entirely."]}]
    model.chat(other, max_new_tokens=4)  # the cache now diverges from `follow_up` right after the image
    after_divergence = [r.token for r in model.stream_generate(follow_up, max_new_tokens=8)]
    result = converted46("16x", "f32")
    fresh = load(result.llm_path, result.mmproj_path)
    try:
        assert reused == after_divergence == [r.token for r in fresh.stream_generate(follow_up, max_new_tokens=8)]
    finally:
        fresh.close()


@pytest.mark.parametrize("variant", ["minicpm-v-4.6", "minicpm-v-4.6-thinking"])
def test_thinking_switch_renders_the_published_template(variant: str, tiny_checkpoint, workdir: Path) -> None:
    family = variant
    folder = tiny_checkpoint(family)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    result = convert_checkpoint(folder, workdir / "46" / f"template-{family}", "q8_0")
    model = load(result.llm_path, result.mmproj_path)
    try:
        msgs = [{"role": "user", "content": QUESTION}]
        for thinking in (False, True):
            [text], _ = model.prompt.render(msgs, None, thinking)
            assert text == tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                         enable_thinking=thinking)
        [thinking_prompt], _ = model.prompt.render(msgs, None, True)
        assert thinking_prompt.endswith("<think>\n")
    finally:
        model.close()


def test_both_modes_convert_side_by_side_and_run_quantized(checkpoint: Path, tmp_path: Path) -> None:
    sixteen = convert_checkpoint(checkpoint, tmp_path, "q4_k_m")
    four = convert_checkpoint(checkpoint, tmp_path, "q4_k_m", downsample_mode="4x")
    assert sixteen.llm_path == four.llm_path and sixteen.mmproj_path != four.mmproj_path
    assert four.mmproj_path.name.endswith("-4x-F16.gguf")
    factors = {}
    for result in (sixteen, four):
        fields = GGUFReader(result.mmproj_path).fields
        factors[result.mmproj_path.name] = fields["clip.vision.projector.scale_factor"].contents()
        assert fields["clip.projector_type"].contents() == "minicpmv4_6"
    assert sorted(factors.values()) == [2, 4]
    names = {t.name for t in GGUFReader(four.mmproj_path).tensors}
    assert not any("vit_merger" in name for name in names)
    with pytest.raises(EngineError, match="one mmproj GGUF"):
        load(tmp_path)
    for result in (sixteen, four):
        model = load(result.llm_path, result.mmproj_path)
        answer = model.chat([{"role": "user", "content": [random_image((900, 600), 5), QUESTION]}], max_new_tokens=6)
        assert answer.timings["generation_tokens"] >= 1
        model.close()


@pytest.mark.parametrize("method,act_order", [("gptq", False), ("gptq", True), ("awq", False)])
def test_int4_checkpoint_matches_transformers_on_its_dequantized_weights(method: str, act_order: bool,
                                                                         checkpoint: Path, reference,
                                                                         tmp_path: Path) -> None:  # noqa: ANN001
    """GPTQ/AWQ packing of 4.6's projections (attention, MLP and linear-attention in/out): the converted F32 GGUF
    against transformers' class holding the same dequantized weights (tolerances as for the float model), and
    close to the float source (correlation >= 0.95: 4-bit groups of 32 carry ~1/15 of a group's range)."""
    from minicpmv_edge.convert.checkpoint import open_checkpoint
    from minicpmv_edge.convert.int4 import dequantize_awq, dequantize_gptq
    from minicpmv_edge.synthetic import make_int4_checkpoint

    folder = make_int4_checkpoint(checkpoint, tmp_path / "int4", method, 32, act_order)
    result = convert_checkpoint(folder, tmp_path / "gguf", "f32")
    model = load(result.llm_path, result.mmproj_path)
    ids = model.engine.tokenize("<|im_start|>user\nRead the page aloud, line by line.<|im_end|>\n<|im_start|>assistant\n")
    ours = model.prompt_logits(ids)
    model.close()

    packed = open_checkpoint(folder)
    state = {}
    for name in packed.tensors:
        if name.endswith(".qweight"):
            base = name[: -len("qweight")]
            parts = {p: packed.read(base + p, as_stored=True) for p in ("qweight", "qzeros", "scales", "g_idx")
                     if base + p in packed.tensors}
            state[base + "weight"] = torch.from_numpy(dequantize_gptq(**parts) if method == "gptq"
                                                      else dequantize_awq(**parts, group_size=32))
    packed.close()
    assert len(state) == 4 * 3 + 4 * 3 - 3 + 4  # per layer: 3 MLP; linear layers 3 (qkv, z, out); full layer 4
    dequantized = transformers.MiniCPMV4_6ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    missing, unexpected = dequantized.load_state_dict(state, strict=False)
    assert not unexpected
    with torch.no_grad():
        expected = dequantized(input_ids=torch.tensor([ids])).logits[0].numpy()
        original = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
    ours = ours[:, : expected.shape[1]]
    assert (ours.argmax(-1) == expected.argmax(-1)).all() and np.abs(ours - expected).max() < 0.01
    correlation = np.corrcoef(ours.ravel(), original.ravel())[0, 1]
    assert correlation >= 0.95


@pytest.mark.parametrize("source, damage, flags, needle", [
    (FAMILY, edit_config("text_config", linear_conv_kernel_dim=None), [], "lacks the key 'linear_conv_kernel_dim'"),
    (FAMILY, edit_config(insert_layer_id=5), [], "insert_layer_id 5 is outside the 3 vision layers"),
    (FAMILY, edit_config("text_config", layer_types=["full_attention"]), [], "layer_types has 1 entries for 4 layers"),
    (FAMILY, edit_config(), ["--downsample-mode", "8x"], "downsample mode must be one of 16x, 4x"),
    ("minicpm-v-4.5", edit_config(), ["--downsample-mode", "4x"], "applies to MiniCPM-V 4.6's merger"),
])
def test_bad_input_fails_in_one_line(source: str, damage, flags: list[str], needle: str, tmp_path: Path,
                                     tiny_checkpoint) -> None:  # noqa: ANN001
    folder = broken_copy(tmp_path, tiny_checkpoint(source))
    damage(folder)
    outdir = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(folder), "-o", str(outdir), "-q", *flags), outdir, needle)
