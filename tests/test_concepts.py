"""Concept files: every format round-trips, bad files are refused with a clear message, and a concept
written by minti gives diffusers' `load_textual_inversion` the same prompt embeddings as minti."""
import copy
import os
import pickle

import pytest
import safetensors
import torch
from safetensors.torch import save_file

import minti.io.concepts as mc
from minti.io.tokenizer_files import read_tokenizer_folder
from minti.io.concepts import (
    Concept,
    ConceptError,
    check_width,
    export_resolution,
    load_concepts,
    save_a1111,
    save_diffusers,
    save_multires,
)
from minti.io.prompt_syntax import expand_prompt
from minti.multires import timestep_of
from minti.textual_inversion import add_words, time_bucket
from minti.textual_inversion import splice as embed_ids

A1111_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def rand_concept(token="<cat>", n=1, width=768, resolutions=None, step=None):
    shape = (n, width) if resolutions is None else (resolutions, n, width)
    return Concept(token, torch.randn(shape), step=step)


def only(concepts):
    assert len(concepts) == 1, [c.token for c in concepts]
    return concepts[0]


# ------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
def test_diffusers_round_trip(tmp_path, n, ext):
    concept = rand_concept("<cat-toy>", n)
    path = tmp_path / f"learned_embeds{ext}"
    save_diffusers(path, concept)
    if ext == ".safetensors":
        with safetensors.safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert list(f.keys()) == ["<cat-toy>"]
            assert f.get_tensor("<cat-toy>").shape == (n, 768)
    else:
        raw = torch.load(path, weights_only=True)
        assert list(raw) == ["<cat-toy>"] and raw["<cat-toy>"].shape == (n, 768)
    back = only(load_concepts(path))
    assert back.token == "<cat-toy>" and back.meta["format"] == "diffusers" and not back.is_multires
    assert back.num_vectors == n and back.width == 768
    assert torch.equal(back.vectors, concept.vectors)
    # A diffusers folder is read too.
    assert torch.equal(only(load_concepts(tmp_path)).vectors, concept.vectors)


def test_old_diffusers_file_with_a_bare_768_vector(tmp_path):
    v = torch.randn(768)
    torch.save({"<sks>": v}, tmp_path / "learned_embeds.bin")
    back = only(load_concepts(tmp_path / "learned_embeds.bin"))
    assert back.vectors.shape == (1, 768) and torch.equal(back.vectors[0], v)


def test_diffusers_file_with_several_words_returns_them_all(tmp_path):
    words = {"<a>": torch.randn(1, 768), "<b>": torch.randn(2, 768), "<c>": torch.randn(768)}
    save_file(words, tmp_path / "three.safetensors", metadata={"format": "pt"})
    back = {c.token: c.vectors for c in load_concepts(tmp_path / "three.safetensors")}
    assert set(back) == set(words)
    for token, v in words.items():
        assert torch.equal(back[token], v.reshape(-1, 768))
    with pytest.raises(ConceptError, match="rename only a lone word"):
        load_concepts(tmp_path / "three.safetensors", token="<x>")


def test_a1111_file_is_written_as_a1111_writes_it(tmp_path):
    concept = rand_concept("<cat>", 2, step=1500)
    path = tmp_path / "cat.pt"
    save_a1111(path, concept, sd_checkpoint="e1441589a6", sd_checkpoint_name="v1-5-pruned-emaonly")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == A1111_KEYS
    assert raw["string_to_token"] == {"*": 265}
    assert list(raw["string_to_param"]) == ["*"]
    param = raw["string_to_param"]["*"]
    assert param.dtype == torch.float32 and param.shape == (2, 768) and not param.requires_grad
    assert torch.equal(param, concept.vectors)
    assert (raw["name"], raw["step"]) == ("<cat>", 1500)
    assert (raw["sd_checkpoint"], raw["sd_checkpoint_name"]) == ("e1441589a6", "v1-5-pruned-emaonly")
    back = only(load_concepts(path))
    assert back.token == "<cat>" and back.step == 1500 and back.meta["format"] == "a1111"
    assert back.meta["sd_checkpoint"] == "e1441589a6" and torch.equal(back.vectors, concept.vectors)
    # The file-name rule of A1111 itself is one argument away.
    assert only(load_concepts(path, token="cat")).token == "cat"


def test_a1111_file_without_a_name_is_named_after_the_file(tmp_path):
    v = torch.randn(1, 768)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": None, "step": 0},
               tmp_path / "charturner.pt")
    back = only(load_concepts(tmp_path / "charturner.pt"))
    assert back.token == "charturner" and back.step == 0 and torch.equal(back.vectors, v)


def test_a1111_file_saved_on_cuda_loads_without_cuda(tmp_path, monkeypatch):
    """A1111 trains on the GPU, so its tensors are tagged 'cuda:0'; this machine has no CUDA."""
    v = torch.randn(2, 768, requires_grad=True)  # A1111's vec is the trained leaf
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "gpu-word", "step": 7,
            "sd_checkpoint": None, "sd_checkpoint_name": None}
    with monkeypatch.context() as m:  # make torch.save tag the storage as CUDA's
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(data, tmp_path / "gpu-word.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really says cuda
            torch.load(tmp_path / "gpu-word.pt", weights_only=True)
    back = only(load_concepts(tmp_path / "gpu-word.pt"))
    assert back.vectors.device.type == "cpu" and not back.vectors.requires_grad
    assert torch.equal(back.vectors, v.detach()) and back.step == 7


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_kohya_fp16_file(tmp_path, ext):
    v = torch.randn(3, 768).half()
    path = tmp_path / f"my-style{ext}"
    if ext == ".safetensors":
        save_file({"emb_params": v}, path, metadata={"modelspec.title": "my style", "format": "pt"})
    else:
        torch.save({"emb_params": v}, path)
    back = only(load_concepts(path))
    assert back.token == "my-style" and back.meta["format"] == "kohya"  # the file name, as in A1111
    assert back.vectors.dtype == torch.float32 and torch.equal(back.vectors, v.float())
    if ext == ".safetensors":
        assert back.meta["modelspec.title"] == "my style"
    assert only(load_concepts(path, token="<style>")).token == "<style>"


def paper_file(path, placeholders=("*",), n=1, width=768):
    """An `embeddings.pt` as the paper's EmbeddingManager.save writes it (rinongal/textual_inversion)."""
    params = torch.nn.ParameterDict()
    tokens = {}
    for i, ph in enumerate(placeholders):
        params[ph] = torch.nn.Parameter(torch.randn(n, width))
        tokens[ph] = torch.tensor(265 + i)  # tokenizer(ph)["input_ids"][0, 1]: a 0-d int64 tensor
    torch.save({"string_to_token": tokens, "string_to_param": params}, path)
    return params


def test_paper_embeddings_pt_with_a_parameter_dict(tmp_path):
    path = tmp_path / "embeddings.pt"
    params = paper_file(path, n=2)
    with pytest.raises(pickle.UnpicklingError, match="ParameterDict"):  # why an allow-list is needed
        torch.load(path, weights_only=True)
    back = only(load_concepts(path))
    assert back.token == "*" and back.meta["format"] == "textual_inversion_paper"
    assert back.meta["placeholder_ids"] == {"*": 265}
    assert torch.equal(back.vectors, params["*"].detach()) and not back.vectors.requires_grad
    assert only(load_concepts(path, token="<statue>")).token == "<statue>"


def test_paper_file_with_two_placeholders(tmp_path):
    params = paper_file(tmp_path / "embeddings_gs-6099.pt", placeholders=("*", "@"))
    back = {c.token: c.vectors for c in load_concepts(tmp_path / "embeddings_gs-6099.pt")}
    assert set(back) == {"*", "@"} and torch.equal(back["@"], params["@"].detach())


def test_only_parameter_dict_is_added_to_the_allow_list():
    """The rest of what the paper's file needs is in torch's default weights_only allow-list."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = _get_allowed_globals()
    needed = ("torch.nn.parameter.Parameter", "torch._utils._rebuild_parameter", "collections.OrderedDict")
    for name in needed:
        assert name in allowed
    assert "torch.nn.modules.container.ParameterDict" not in allowed


def test_multires_round_trip_and_metadata(tmp_path):
    concept = Concept("<jane>", torch.randn(10, 2, 768), step=3000, meta={"model": "sd15", "hash": "abc"})
    path = tmp_path / "jane.safetensors"
    save_multires(path, concept)
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"vectors", "time_edges"}
    assert meta["format"] == "minti-multires" and meta["token"] == "<jane>"
    assert (meta["resolutions"], meta["vectors"], meta["width"], meta["step"]) == ("10", "2", "768", "3000")
    assert meta["model"] == "sd15" and meta["hash"] == "abc"
    back = only(load_concepts(path))
    assert back.is_multires and back.num_buckets == 10 and back.num_vectors == 2 and back.width == 768
    assert back.token == "<jane>" and back.step == 3000 and back.meta["model"] == "sd15"
    assert torch.equal(back.vectors, concept.vectors)
    check_width(back, 768)
    # Two tensors in the file: diffusers refuses it rather than reading 10 buckets as 10 vectors.
    from diffusers.loaders import TextualInversionLoaderMixin

    state = safetensors.torch.load_file(path)
    with pytest.raises(ValueError, match="incorrect"):
        TextualInversionLoaderMixin._retrieve_tokens_and_embeddings([None], [state], tokenizer=None)
    with pytest.raises(ConceptError, match="multiresolution word"):
        save_diffusers(tmp_path / "x.safetensors", concept)
    with pytest.raises(ConceptError, match="multiresolution word"):
        save_a1111(tmp_path / "x.pt", concept)


def test_multires_file_with_inconsistent_metadata_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"vectors": torch.randn(4, 1, 768), "time_edges": torch.linspace(0, 1, 5)}, path,
              metadata={"format": "minti-multires", "token": "<x>", "resolutions": "10"})
    with pytest.raises(ConceptError, match="inconsistent"):
        load_concepts(path)


@pytest.mark.parametrize("t, T, bucket", [
    (0.0, 10, 0), (0.05, 10, 0), (0.1, 10, 1), (0.3, 10, 3), (0.7, 10, 7), (0.999, 10, 9), (1.0, 10, 9),
    (0.29, 100, 29), (0.5, 3, 1),
])
def test_bucket_of_a_time(t, T, bucket):
    assert time_bucket(timestep_of(t), T) == bucket


def test_bucket_matches_the_training_bucket_of_every_integer_timestep():
    for T in (3, 7, 10, 100):
        for timestep in range(1000):
            assert time_bucket(timestep_of(timestep / 1000), T) == timestep * T // 1000


def test_export_resolution_for_tools_without_time(tmp_path):
    concept = Concept("<jane>", torch.randn(10, 2, 768), step=3000)
    r = export_resolution(concept, 0.3)
    assert not r.is_multires and r.token == "<jane-r0.3>" and r.meta["bucket"] == 3
    assert torch.equal(r.vectors, concept.vectors[3])
    save_a1111(tmp_path / "jane-r0.3.pt", r)
    save_diffusers(tmp_path / "jane-r0.3.safetensors", r)
    for name in ("jane-r0.3.pt", "jane-r0.3.safetensors"):
        back = only(load_concepts(tmp_path / name))
        assert back.token == "<jane-r0.3>" and torch.equal(back.vectors, concept.vectors[3])
    assert export_resolution(concept, 1, token="jane_hi").token == "jane_hi"
    assert torch.equal(export_resolution(concept, 1.0).vectors, concept.vectors[9])
    with pytest.raises(ConceptError, match=r"\[0, 1\]"):
        export_resolution(concept, 1.5)
    with pytest.raises(ConceptError, match="ordinary word"):
        export_resolution(rand_concept(), 0.5)


# --------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("width, family", [
    (1024, "SD 2.x"), (1280, "SDXL"), (2048, "SDXL"), (500, "unknown"),
])
def test_width_refusal_names_the_family(tmp_path, width, family):
    concept = rand_concept("<w>", 1, width)
    with pytest.raises(ConceptError, match=family):
        check_width(concept, expected=768)
    save_diffusers(tmp_path / "w.safetensors", concept)
    with pytest.raises(ConceptError, match=f"width {width}.*{family}"):
        load_concepts(tmp_path / "w.safetensors", expected_width=768)
    check_width(concept, expected=width)


def test_sdxl_file_is_refused(tmp_path):
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(ConceptError, match="SDXL"):
        load_concepts(tmp_path / "xl.safetensors")


def test_files_that_are_not_embeddings(tmp_path):
    cases = {
        "empty.pt": b"",
        "notes.txt": b"this is not an embedding at all\n",
        "image.png": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "noise.bin": os.urandom(256).replace(b"\x80", b"\x81").replace(b"PK", b"pk"),
    }
    messages = {"empty.pt": "empty", "notes.txt": "not an embedding", "image.png": "image",
                "noise.bin": "not an embedding"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConceptError, match=messages[name]):
            load_concepts(tmp_path / name)
    with pytest.raises(ConceptError, match="No such"):
        load_concepts(tmp_path / "missing.pt")
    torch.save({"state_dict": {"w": torch.randn(3, 3)}, "epoch": 1}, tmp_path / "model.ckpt")
    with pytest.raises(ConceptError, match="not an embedding file minti knows"):
        load_concepts(tmp_path / "model.ckpt")
    save_file({"conv.weight": torch.randn(4, 4, 3, 3)}, tmp_path / "model.safetensors")
    with pytest.raises(ConceptError, match=r"\[n, D\]"):
        load_concepts(tmp_path / "model.safetensors")
    lora = {"lora_up": torch.randn(320, 4), "lora_down": torch.randn(4, 768)}
    save_file(lora, tmp_path / "lora.safetensors")
    with pytest.raises(ConceptError, match="widths"):
        load_concepts(tmp_path / "lora.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConceptError, match="not an embedding"):
        load_concepts(tmp_path / "list.pt")


@pytest.mark.parametrize("writer, name", [(save_diffusers, "e.safetensors"), (save_a1111, "e.pt")])
def test_truncated_files_are_refused(tmp_path, writer, name):
    path = tmp_path / name
    writer(path, rand_concept("<t>", 4))
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 10, 12):
        path.write_bytes(data[:keep])
        with pytest.raises(ConceptError, match="truncated"):
            load_concepts(path)


def test_empty_and_non_finite_vectors_are_refused(tmp_path):
    save_file({"<e>": torch.zeros(0, 768)}, tmp_path / "empty.safetensors")
    with pytest.raises(ConceptError, match="empty"):
        load_concepts(tmp_path / "empty.safetensors")
    for bad in (float("nan"), float("inf")):
        v = torch.randn(2, 768)
        v[1, 5] = bad
        torch.save({"<n>": v}, tmp_path / "nan.bin")
        with pytest.raises(ConceptError, match="NaN/Inf"):
            load_concepts(tmp_path / "nan.bin")
        with pytest.raises(ConceptError, match="NaN/Inf"):
            save_diffusers(tmp_path / "out.safetensors", Concept("<n>", v))
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ConceptError, match="empty"):
        Concept("<e>", torch.zeros(0, 768))
    with pytest.raises(ConceptError, match=r"v\[None\]"):
        Concept("<e>", torch.zeros(768))
    with pytest.raises(ConceptError, match="spaces"):
        Concept("my word", torch.zeros(1, 768))


SIDE_EFFECTS = []


def _side_effect(*args):
    SIDE_EFFECTS.append(args)
    return "pwned"


class Payload:
    """Unpickling this would call _side_effect: the shape of every malicious pickle."""

    def __reduce__(self):
        return (_side_effect, ("ran code from a file",))


class Sneaky:
    """An arbitrary class in an otherwise normal-looking embedding dict."""

    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("payload", ["reduce", "object"])
def test_pickled_code_is_refused(tmp_path, payload):
    v = torch.randn(1, 768)
    extra = Payload() if payload == "reduce" else Sneaky()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "evil", "step": extra},
               tmp_path / "evil.pt")
    with pytest.raises(ConceptError, match="Refusing to load .*(_side_effect|Sneaky)"):
        load_concepts(tmp_path / "evil.pt")
    assert SIDE_EFFECTS == []


# ---------------------------------------------------------------------------------- atomic writes

@pytest.mark.parametrize("target, name, writer", [
    ("torch.save", "c.pt", save_a1111),
    ("torch.save", "c.bin", save_diffusers),
    ("safetensors.torch.save_file", "c.safetensors", save_diffusers),
    ("safetensors.torch.save_file", "m.safetensors", save_multires),
])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch, target, name, writer, error):
    multires = writer is save_multires
    path = tmp_path / name
    writer(path, rand_concept("<old>", 2, resolutions=3 if multires else None))
    before = path.read_bytes()

    def half_then_fail(obj, f, *args, **kwargs):
        with open(f, "wb") as out:  # half a file reaches the disk, then the write dies
            out.write(b"PK\x03\x04" + bytes(100))
        raise error

    module, attr = target.rsplit(".", 1)
    monkeypatch.setattr(eval(module, {"torch": torch, "safetensors": safetensors}), attr, half_then_fail)
    with pytest.raises(type(error)):
        writer(path, rand_concept("<new>", 2, resolutions=3 if multires else None))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind
    assert only(load_concepts(path)).token == "<old>"


def test_writing_creates_the_folder_and_replaces_an_old_file(tmp_path):
    path = tmp_path / "out" / "deeper" / "learned_embeds.safetensors"
    save_diffusers(path, rand_concept("<a>"))
    new = rand_concept("<b>", 2)
    save_diffusers(path, new)
    assert torch.equal(only(load_concepts(path)).vectors, new.vectors)
    assert os.listdir(path.parent) == ["learned_embeds.safetensors"]


def test_a_view_of_a_big_table_is_saved_alone(tmp_path):
    table = torch.randn(5000, 768)
    save_a1111(tmp_path / "v.pt", Concept("<v>", table[10:12]))
    assert os.path.getsize(tmp_path / "v.pt") < 20_000  # not the whole 15 MB storage


# ----------------------------------------------------------------------------- bridge to the model

def test_embed_ids_splices_vectors_and_leaves_the_table_alone():
    V, D = 50, 8
    table = torch.randn(V, D)
    snapshot = table.clone()
    new_ids = [50, 51, 52]  # past the end of the table, as the tokenizer's added tokens are
    vectors = torch.randn(3, D, requires_grad=True)
    ids = torch.tensor([[49, 1, 50, 51, 52, 2, 49], [49, 52, 3, 50, 4, 49, 49]])
    out = embed_ids(ids, table, new_ids, vectors)
    assert out.shape == (2, 7, D)
    rows = [[vectors[i - 50] if i >= 50 else table[i] for i in row] for row in ids]
    expected = torch.stack([torch.stack(row) for row in rows])
    assert torch.equal(out, expected)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    grad = torch.zeros(3, D)
    for b, row in enumerate(ids):
        for j, i in enumerate(row):
            if i >= 50:
                grad[i - 50] += weights[b, j]
    torch.testing.assert_close(vectors.grad, grad, atol=1e-6, rtol=0)
    assert torch.equal(table, snapshot) and table.grad is None


def test_embed_ids_per_sample_vectors_and_ids_inside_the_table():
    V, D = 30, 4
    table = torch.randn(V, D, requires_grad=True)  # even a trainable table gets no gradient at placeholders
    ids = torch.tensor([[1, 7, 2], [7, 7, 3]])  # 7: an ordinary id used as a placeholder (the paper's "*")
    vectors = torch.randn(2, 1, D, requires_grad=True)  # [B, K, D]: each sample its own word
    out = embed_ids(ids, table, torch.tensor([7]), vectors)
    assert torch.equal(out[0, 1], vectors[0, 0]) and torch.equal(out[1, 0], vectors[1, 0])
    assert torch.equal(out[1, 1], vectors[1, 0]) and torch.equal(out[0, 0], table[1])
    out.sum().backward()
    assert torch.equal(table.grad[7], torch.zeros(D))
    torch.testing.assert_close(vectors.grad[:, 0], torch.tensor([[1.0] * D, [2.0] * D]))


def test_embed_ids_errors_and_dtypes():
    table = torch.randn(10, 4).bfloat16()
    vectors = torch.randn(1, 4)
    out = embed_ids(torch.tensor([[1, 10]]), table, [10], vectors)
    assert out.dtype == torch.bfloat16 and torch.equal(out[0, 1], vectors[0].bfloat16())
    with pytest.raises(ValueError, match="no row in the table"):
        embed_ids(torch.tensor([[1, 11]]), table, [10], vectors)
    with pytest.raises(ValueError, match=r"\[K, 4\]"):
        embed_ids(torch.tensor([[1, 10]]), table, [10, 12], vectors)
    ids = torch.tensor([[1, 2]])
    assert torch.equal(embed_ids(ids, table, [], torch.zeros(0, 4)), table[ids])


# ----------------------------------------------------------------------- tokenizer and diffusers

@pytest.fixture(scope="module")
def vocab_folder(clip_vocab_folder):
    """CLIP's vocabulary as vocab.json + merges.txt, converted from CLIP's merges file without minti."""
    return clip_vocab_folder


def minti_tokenizer(folder):

    return read_tokenizer_folder(folder)


def hf_tokenizer(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def test_add_words(vocab_folder):
    tok = minti_tokenizer(vocab_folder)
    size = len(tok)
    ids = add_words(tok, {"<cat>": 3, "<dog>": 1})
    assert ids == {"<cat>": [size, size + 1, size + 2], "<dog>": [size + 3]}
    for name, i in zip(["<cat>", "<cat>_1", "<cat>_2", "<dog>"], range(size, size + 4)):
        assert tok.token_to_id(name) == i
    assert tok.encode("a <cat> <cat>_1 <cat>_2 <dog>")[2:6] == [size, size + 1, size + 2, size + 3]
    with pytest.raises(ValueError, match="already in the tokenizer"):
        add_words(tok, {"<bird>": 1, "<dog>": 1})
    assert len(tok) == size + 4  # nothing added by a refused call
    with pytest.raises(ValueError, match="already in the tokenizer"):
        add_words(tok, {"*": 1})  # the paper's placeholder is an existing CLIP token
    with pytest.raises(ValueError, match="same placeholder"):
        add_words(tok, {"<x>": 2, "<x>_1": 1})
    assert len(tok) == size + 4


PROMPTS = [
    "a photo of <cat>",
    "<cat> and <dog> next to a <bird>, oil painting of <cat>",
    "<cat>s on a beach",
    "a painting in the style of <bird>",
    "nothing learned here",
    "<cat>,<bird><dog>",
    "a <dog> and a <DOG>",
]


def test_expand_prompt_equals_diffusers_maybe_convert_prompt(vocab_folder):
    from diffusers.loaders import TextualInversionLoaderMixin

    concepts = [rand_concept("<cat>", 3), rand_concept("<dog>", 1), rand_concept("<bird>", 2)]
    hf = hf_tokenizer(vocab_folder)
    for c in concepts:  # registered as load_textual_inversion registers them
        hf.add_tokens(c.placeholder_tokens)
    mixin = TextualInversionLoaderMixin()
    for prompt in PROMPTS:
        assert expand_prompt(prompt, concepts) == mixin.maybe_convert_prompt(prompt, hf), prompt
    assert expand_prompt(PROMPTS, concepts) == mixin.maybe_convert_prompt(PROMPTS, hf)
    assert expand_prompt("a photo of <cat>", concepts) == "a photo of <cat> <cat>_1 <cat>_2"


@pytest.fixture(scope="module")
def tiny_sd(vocab_folder):
    """The components of a tiny random StableDiffusionPipeline with CLIP's real vocabulary."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFCLIPTextModel

    torch.manual_seed(0)
    text_cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77)
    text_encoder = HFCLIPTextModel(HFConfig(**text_cfg, hidden_act="quick_gelu", bos_token_id=49406,
                                            eos_token_id=49407, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    )
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    return dict(text_encoder=text_encoder, unet=unet, vae=vae, scheduler=DDIMScheduler(), text_cfg=text_cfg)


def diffusers_prompt_embeds(tiny_sd, vocab_folder, path, prompts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_sd["vae"], text_encoder=copy.deepcopy(tiny_sd["text_encoder"]),
        tokenizer=hf_tokenizer(vocab_folder), unet=tiny_sd["unet"], scheduler=tiny_sd["scheduler"],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(path))
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    expanded = pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
    ids = pipe.tokenizer(expanded, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    return embeds, ids


def minti_prompt_embeds(tiny_sd, vocab_folder, path, prompts):
    from minti.clip import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(**tiny_sd["text_cfg"])).eval()
    state = {"text_model." + k: v for k, v in tiny_sd["text_encoder"].state_dict().items()}
    encoder.load_state_dict(state, strict=True)  # transformers 5 writes its keys without "text_model."
    tok = minti_tokenizer(vocab_folder)
    concepts = load_concepts(path, expected_width=32)
    added = add_words(tok, {c.token: c.num_vectors for c in concepts})
    new_ids = torch.tensor([i for c in concepts for i in added[c.token]])
    vectors = torch.cat([c.vectors for c in concepts])
    ids = tok(expand_prompt(prompts, concepts), length=77)
    table = encoder.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        return encoder(ids, inputs_embeds=embed_ids(ids, table, new_ids, vectors)), ids


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("fmt", ["diffusers", "a1111"])
def test_diffusers_load_textual_inversion_gives_minti_embeddings(tmp_path, tiny_sd, vocab_folder, n, fmt):
    concept = Concept("<toy>", torch.randn(n, 32))
    if fmt == "diffusers":
        path = tmp_path / "learned_embeds.safetensors"
        save_diffusers(path, concept)
    else:
        path = tmp_path / "toy.pt"
        save_a1111(path, concept)
    prompts = ["a photo of <toy>", "<toy> on a beach next to a red <toy>, oil painting"]
    theirs, their_ids = diffusers_prompt_embeds(tiny_sd, vocab_folder, path, prompts)
    ours, our_ids = minti_prompt_embeds(tiny_sd, vocab_folder, path, prompts)
    assert torch.equal(our_ids, their_ids)  # same placeholder ids, same expansion, same padding
    assert (our_ids >= 49408).sum() == 3 * n
    assert ours.shape == theirs.shape == (2, 77, 32)
    err = (ours - theirs).abs().max().item()
    print(f"{fmt} n={n}: max |minti - diffusers| = {err:.2e}")
    assert err < 1e-5
    # The concept did something: the same prompts without the learned word differ.
    plain, _ = minti_prompt_embeds(tiny_sd, vocab_folder, path, [p.replace("<toy>", "toy") for p in prompts])
    assert (plain - ours).abs().max() > 1e-3


def test_safetensors_whose_header_length_starts_with_the_pickle_byte(tmp_path):
    """A safetensors header of 384 bytes (0x180) starts the file with 0x80, the byte a bare pickle
    starts with; the file must still be read as safetensors, metadata included."""
    import json
    import struct

    vector = torch.arange(4, dtype=torch.float32).reshape(1, 4)
    header = json.dumps({"<x>": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]}}).encode()
    header = header.ljust(384, b" ")
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + vector.numpy().tobytes())
    assert path.read_bytes()[0] == 0x80
    assert mc.file_kind(str(path)) == "safetensors"  # not taken for a pickle (which would lose metadata)
    (concept,) = load_concepts(str(path))
    assert concept.token == "<x>" and torch.equal(concept.vectors, vector)
