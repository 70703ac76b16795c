"""Textual-inversion embeddings: the file formats, matching to a model, prompt splicing, TI hashes."""

from __future__ import annotations

import copy
import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from darkroom.home import Home
from darkroom.models.loader import LoadOptions, load_checkpoint
from darkroom.text.conditioning import PromptEncoder
from darkroom.text.embeddings import (
    EmbeddingError,
    EmbeddingLibrary,
    format_ti_hashes,
    parse_ti_hashes,
    read_embedding,
)
from darkroom.text.prompt_parser import PLACEHOLDER, EmbeddingVocab, tokenize_weighted
from darkroom.text.tokenizer import BOS, EOS, load_clip_tokenizer

NAME = "zorblax"  # several BPE tokens: matching must be on the whole token sequence
FREE_IDS = (100, 101, 102)  # token ids not used by the test prompts: the reference puts the vectors there


def vecs(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_pt(path: Path, v: torch.Tensor, *, parameter_dict: bool = False) -> Path:
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(v.clone())}) if parameter_dict else {"*": v.clone()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": path.stem, "step": 1500,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5"}, path)
    return path


def write_bin(path: Path, v: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"<{path.stem}>": v[0].clone()}, path)
    return path


def write_st(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


_touched: list[str] = []


def _side_effect(marker: str) -> None:  # what a malicious pickle would run on load
    Path(marker).write_text("ran")
    _touched.append(marker)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return load_checkpoint(tiny_model("sd1")["path"], LoadOptions())


@pytest.fixture(scope="module")
def sdxl(tiny_model):
    return load_checkpoint(tiny_model("sdxl")["path"], LoadOptions())


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


def embeddings_for(model, tmp_path: Path, files: dict[str, dict[str, torch.Tensor]] | None = None, **lib):
    home = Home(tmp_path / "h").ensure()
    for fn, tensors in (files or {}).items():
        write_st(home.embeddings / fn, tensors)
    return EmbeddingLibrary(home).for_model(model)


def width(slot) -> int:
    return slot.model.get_input_embeddings().weight.shape[1]


def reference_pass(slot, tokenizer, before: str, vectors: torch.Tensor, after: str, pad_id: int):
    """Independently of the hook: a copy of the encoder with the vectors written into token rows
    FREE_IDS, fed ids with those rows where the embedding's name was."""
    te = copy.deepcopy(slot.model)
    with torch.no_grad():
        for i, v in enumerate(vectors):
            te.get_input_embeddings().weight[FREE_IDS[i]] = v
    ids = [BOS, *tokenizer(before, add_special_tokens=False).input_ids, *FREE_IDS[: len(vectors)],
           *tokenizer(after, add_special_tokens=False).input_ids, EOS]
    ids += [pad_id] * (77 - len(ids))
    with torch.no_grad():
        return te(input_ids=torch.tensor([ids]), output_hidden_states=True)


# --------------------------------------------------------------------------- files


def test_the_three_formats_read_alike(tmp_path):
    v = vecs(2, 32, 0)
    pt = read_embedding(write_pt(tmp_path / "a.pt", v))
    old = read_embedding(write_pt(tmp_path / "old.pt", v, parameter_dict=True))  # 2022 files: a ParameterDict
    st = read_embedding(write_st(tmp_path / "b.safetensors", {"emb_params": v}))
    one = read_embedding(write_bin(tmp_path / "learned_embeds.bin", v))
    xl = read_embedding(write_st(tmp_path / "x.safetensors", {"clip_l": vecs(3, 32, 1), "clip_g": vecs(3, 48, 2)}))
    for e in (pt, old, st):
        assert torch.equal(e.vectors[""], v) and e.count == 2 and e.shape == 32 and not e.is_sdxl
    assert (pt.name, st.name, one.name) == ("a", "b", "learned_embeds")  # the file stem triggers it
    assert torch.equal(one.vectors[""], v[:1]) and one.count == 1
    assert pt.a1111() == {"step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5",
                          "shape": 32, "vectors": 2}
    assert xl.is_sdxl and xl.count == 3 and xl.shape == 80


def test_pickle_with_code_is_refused_without_running_it(tmp_path, caplog, sd1):
    home = Home(tmp_path / "h").ensure()
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": {"*": _Evil(str(marker))}}, home.embeddings / "evil.pt")
    with pytest.raises(EmbeddingError, match="evil.pt: refused"):
        read_embedding(home.embeddings / "evil.pt")
    write_st(home.embeddings / "fine.safetensors", {"emb_params": vecs(1, 32, 3)})
    with caplog.at_level(logging.WARNING, logger="darkroom.text.embeddings"):
        found = EmbeddingLibrary(home).for_model(sd1)
    assert not marker.exists() and not _touched
    assert list(found) == ["fine"]
    assert "refused" in found.errors[str(home.embeddings / "evil.pt")].reason
    assert "evil.pt" in caplog.text


def test_files_that_are_not_embeddings(tmp_path, tiny_model):
    lora = write_st(tmp_path / "lora.safetensors", {f"lora_unet_x{i}.lora_down.weight": torch.zeros(2, 2)
                                                    for i in range(3)})
    with pytest.raises(EmbeddingError, match="LoRA"):
        read_embedding(lora)
    ckpt = tmp_path / "ckpt.safetensors"
    shutil.copy(tiny_model("sd1")["path"], ckpt)
    with pytest.raises(EmbeddingError, match="not a textual-inversion embedding"):
        read_embedding(ckpt)
    two = write_st(tmp_path / "two.safetensors", {"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)})
    with pytest.raises(EmbeddingError, match="2 tensors"):
        read_embedding(two)
    truncated = write_st(tmp_path / "cut.safetensors", {"emb_params": vecs(4, 32, 0)})
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(EmbeddingError, match="truncated"):
        read_embedding(truncated)


# --------------------------------------------------------------------------- matching


def test_width_mismatch_is_skipped_with_a_reason(tmp_path, sd1):
    found = embeddings_for(sd1, tmp_path, {
        "fits.safetensors": {"emb_params": vecs(1, 32, 0)},
        "wide.safetensors": {"emb_params": vecs(1, 768, 0)},
        "xl.safetensors": {"clip_l": vecs(1, 32, 0), "clip_g": vecs(1, 48, 0)},
    })
    assert list(found) == ["fits"]
    assert set(found.skipped) == {"wide", "xl"}
    assert "768-wide" in found.skipped["wide"].reason and "32" in found.skipped["wide"].reason
    assert "SDXL embedding" in found.skipped["xl"].reason
    listing = found.a1111()
    assert listing["loaded"] == {"fits": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                          "shape": 32, "vectors": 1}}
    assert listing["skipped"]["wide"]["shape"] == 768 and listing["skipped"]["xl"]["shape"] == 80


def test_sdxl_takes_only_sdxl_embeddings(tmp_path, sdxl):
    found = embeddings_for(sdxl, tmp_path, {
        "xl.safetensors": {"clip_l": vecs(2, 32, 0), "clip_g": vecs(2, 48, 1)},
        "sd1.safetensors": {"emb_params": vecs(1, 32, 0)},
        "gonly.safetensors": {"clip_g": vecs(1, 48, 0)},
    })
    assert list(found) == ["xl"]
    assert "clip_l and clip_g" in found.skipped["sd1"].reason
    assert "without clip_l" in found.skipped["gonly"].reason
    clip_l, clip_g = found["xl"].tensors
    assert (clip_l.shape[1], clip_g.shape[1]) == (width(sdxl.text_encoders[0]), width(sdxl.text_encoders[1]))


def test_folders_and_duplicate_names(tmp_path, sd1):
    home = Home(tmp_path / "h")
    a1111, comfy = tmp_path / "a1111", tmp_path / "comfy"
    home.extra_model_dirs = [a1111, comfy]
    home.ensure()
    write_st(home.embeddings / "sub" / "dup.safetensors", {"emb_params": vecs(1, 32, 1)})
    write_st(home.embeddings / "dup.safetensors", {"emb_params": vecs(1, 32, 0)})  # top level wins
    write_st(a1111 / "embeddings" / "nested" / "webui.safetensors", {"emb_params": vecs(1, 32, 2)})
    write_st(comfy / "models" / "embeddings" / "comfy.safetensors", {"emb_params": vecs(1, 32, 3)})
    write_st(home.embeddings / "a" / "both.safetensors", {"emb_params": vecs(1, 768, 4)})  # skipped...
    write_st(home.embeddings / "b" / "both.safetensors", {"emb_params": vecs(1, 32, 5)})  # ...this one fits
    (home.embeddings / "empty.pt").write_bytes(b"")
    found = EmbeddingLibrary(home).for_model(sd1)
    assert list(found) == ["both", "comfy", "dup", "webui"]
    assert torch.equal(found["dup"].tensors[0], vecs(1, 32, 0))
    assert torch.equal(found["both"].tensors[0], vecs(1, 32, 5)) and "both" not in found.skipped
    assert not found.errors


# --------------------------------------------------------------------------- prompts


def test_vectors_take_their_positions_in_chunks(tok):
    vocab = EmbeddingVocab(tok, {NAME: 2, "longname": 75})
    (chunk,) = tokenize_weighted(tok, f"a {NAME} cat", pad_id=EOS, embeddings=vocab)
    cat, a = tok("cat a", add_special_tokens=False).input_ids
    assert chunk.tokens[:6] == [BOS, a, PLACEHOLDER, PLACEHOLDER, cat, EOS]
    assert chunk.fixes == [(2, NAME)]
    # 74 words + 2 vectors do not fit 75: the embedding starts the next chunk, whole
    chunks = tokenize_weighted(tok, "cat " * 74 + NAME, pad_id=EOS, embeddings=vocab)
    assert [c.fixes for c in chunks] == [[], [(1, NAME)]]
    assert chunks[1].tokens[:4] == [BOS, PLACEHOLDER, PLACEHOLDER, EOS]
    # a comma cut moves the embedding with its placeholders
    chunks = tokenize_weighted(tok, "cat " * 60 + f", {NAME} " + "dog " * 20, pad_id=EOS, embeddings=vocab)
    assert [c.fixes for c in chunks] == [[], [(1, NAME)]]
    # by token sequence, as the webui: case-insensitive (CLIP lowercases), inside weighted runs, not
    # where the last token differs ("zorblaxs"), but where BPE ends another word with it ("xzorblax")
    (chunk,) = tokenize_weighted(tok, f"({NAME.upper()}:1.5) {NAME}s x{NAME}", pad_id=EOS, embeddings=vocab)
    assert chunk.multipliers[1:3] == [1.5, 1.5]
    assert chunk.fixes == [(1, NAME), (7, NAME)]  # 2 vectors, zor bla xs, x, then the second
    assert [c.fixes for c in tokenize_weighted(tok, "longname", pad_id=0, embeddings=vocab)] == [[(1, "longname")]]


def test_conditioning_unchanged_without_the_word(tmp_path, sd1):
    found = embeddings_for(sd1, tmp_path, {f"{NAME}.safetensors": {"emb_params": vecs(2, 32, 0)}})
    plain, with_ti = PromptEncoder(sd1), PromptEncoder(sd1, embeddings=found)
    for prompt in ("a photo of a cat", "(zorb:1.2) lax, BREAK cat " * 3 + "dog " * 80):
        assert torch.equal(plain.encode(prompt).context, with_ti.encode(prompt).context)
    assert with_ti.used_embeddings == {}
    assert not torch.equal(plain.encode(f"a {NAME} cat").context, with_ti.encode(f"a {NAME} cat").context)


@pytest.mark.parametrize("fmt", ["pt", "bin", "safetensors"])
def test_conditioning_equals_vectors_in_place_of_the_word(tmp_path, sd1, tok, fmt):
    n = 1 if fmt == "bin" else 2
    v = vecs(n, width(sd1.text_encoders[0]), 7)
    home = Home(tmp_path / "h").ensure()
    path = {"pt": write_pt, "bin": write_bin}.get(fmt, lambda p, t: write_st(p, {"emb_params": t}))(
        home.embeddings / f"{NAME}.{fmt}", v)
    found = EmbeddingLibrary(home).for_model(sd1)
    encoder = PromptEncoder(sd1, embeddings=found)
    got = encoder.encode(f"a photo of {NAME} cat").context
    want = reference_pass(sd1.text_encoders[0], tok, "a photo of", v, "cat", EOS).last_hidden_state
    assert got.shape == (1, 77, 32)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert encoder.used_embeddings == {NAME: hashlib.sha256(path.read_bytes()).hexdigest()[:12]}


def test_emphasis_scales_the_embedding(tmp_path, sd1, tok):
    v = vecs(2, 32, 8)
    found = embeddings_for(sd1, tmp_path, {f"{NAME}.safetensors": {"emb_params": v}})
    got = PromptEncoder(sd1, embeddings=found).encode(f"a ({NAME}:1.5) cat").context
    z = reference_pass(sd1.text_encoders[0], tok, "a", v, "cat", EOS).last_hidden_state
    weights = torch.ones(77)
    weights[2:4] = 1.5
    weighted = z * weights[None, :, None]
    want = weighted * (z.float().mean() / weighted.float().mean())
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, z, atol=1e-3)


def test_sdxl_uses_clip_l_then_clip_g(tmp_path, sdxl, tok):
    clip_l, clip_g = vecs(2, 32, 10), vecs(2, 48, 11)
    found = embeddings_for(sdxl, tmp_path, {f"{NAME}.safetensors": {"clip_l": clip_l, "clip_g": clip_g}})
    cond = PromptEncoder(sdxl, embeddings=found).encode(f"{NAME}, a cat")
    one = reference_pass(sdxl.text_encoders[0], tok, "", clip_l, ", a cat", 49407)
    two = reference_pass(sdxl.text_encoders[1], tok, "", clip_g, ", a cat", 0)
    assert torch.allclose(cond.context[..., :32], one.hidden_states[-2], atol=1e-6, rtol=0)
    assert torch.allclose(cond.context[..., 32:], two.hidden_states[-2], atol=1e-6, rtol=0)
    assert torch.allclose(cond.pooled, two.text_embeds, atol=1e-6, rtol=0)  # pooled at EOS, not at a placeholder
    plain = PromptEncoder(sdxl).encode("a cat, a dog")
    assert torch.equal(plain.pooled, PromptEncoder(sdxl, embeddings=found).encode("a cat, a dog").pooled)


def test_ti_hashes_cover_prompt_and_negative(tmp_path, sd1):
    home = Home(tmp_path / "h").ensure()
    pos = write_st(home.embeddings / "good.safetensors", {"emb_params": vecs(1, 32, 0)})
    neg = write_st(home.embeddings / "bad-hands.safetensors", {"emb_params": vecs(3, 32, 1)})
    encoder = PromptEncoder(sd1, embeddings=EmbeddingLibrary(home).for_model(sd1))
    encoder.encode("good, good cat")
    encoder.encode("bad-hands", zero_if_empty=True)
    h = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (pos, neg)}
    assert encoder.used_embeddings == {"good": h["good"], "bad-hands": h["bad-hands"]}
    text = format_ti_hashes(encoder.used_embeddings)
    assert text == f"good: {h['good']}, bad-hands: {h['bad-hands']}"
    assert parse_ti_hashes(text) == encoder.used_embeddings
    assert format_ti_hashes({"a:b,c": "123"}) == "abc: 123"


def test_engine_generation(tmp_path, tiny_model, engine_factory):
    """Through the real Engine: the word triggers the file from the embeddings folder; TI hashes recorded."""
    from darkroom.request import GenerationRequest

    home = Home(tmp_path / "home").ensure()
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny.safetensors")
    engine = engine_factory(home)

    def run(prompt):
        req = GenerationRequest(prompt=prompt, negative_prompt="blurry", steps=1, width=32, height=32, seed=3,
                                sampler="Euler", cfg_scale=5.0)
        return engine.generate(req).images[0]

    word, plain = run(f"a {NAME} circle"), run("a red circle")
    write_st(home.embeddings / f"{NAME}.safetensors", {"emb_params": vecs(2, 32, 12) * 3})
    with_file = run(f"a {NAME} circle")
    assert with_file.png != word.png
    assert f'TI hashes: "{NAME}: ' in with_file.infotext and "TI hashes" not in word.infotext
    again = run("a red circle")
    assert again.png == plain.png and "TI hashes" not in again.infotext
