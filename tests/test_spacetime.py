"""Space-time words (spacetime.py, spacetime_files.py): the UNet's per-layer context, P+ and NeTI against
their definitions built by hand, the files' round trip and refusals."""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import minti
from minti.run.cli import UsageError
from minti.io.concepts import ConceptError, load_concepts
from minti.spacetime import BYPASS_ALPHA, NeTIMapper, NeTIWord, PerLayerWord, mix_layers, new_spacetime_word
from minti.io.spacetime_files import (export_layer, export_layer_average, from_word, load_spacetime, make_word,
                                   save_spacetime)
from minti.textual_inversion import add_words, diffusion_loss, sampling_conditioning, splice, token_table
from minti.unet import SpatialTransformer, UNet, UNetConfig, cross_attention_layers


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return minti.load("toy")


def ids_with(sd, tokenizer, token, texts):
    return tokenizer([t.replace("{}", token) for t in texts], length=sd.text_encoder.config.max_position_embeddings)


class Spy:
    """Records the context each cross-attention layer's attn2 attends to (forward pre-hooks), by layer name."""

    def __init__(self, unet):
        self.seen, self.handles = {}, []
        for name in cross_attention_layers(unet):
            hook = (lambda n: lambda module, args: self.seen.__setitem__(n, args[1]))(name)
            attn2 = unet.get_submodule(name).transformer_blocks[0].attn2
            self.handles.append(attn2.register_forward_pre_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- UNet

def test_sd15_has_16_cross_attention_layers_named_as_diffusers():
    with torch.device("meta"):
        names = cross_attention_layers(UNet(UNetConfig()))
    assert len(names) == 16
    assert names[:2] == ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1"]
    assert "mid_block.attentions.0" == names[6] and names[-1] == "up_blocks.3.attentions.2"
    assert sum(n.startswith("down") for n in names) == 6 and sum(n.startswith("up") for n in names) == 9


def test_per_layer_context_of_equal_tensors_is_bit_identical_to_one_tensor(sd):
    unet, g = sd.unet, torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 77, 64, generator=g)
    layers = len(cross_attention_layers(unet))
    with torch.no_grad():
        one = unet(x, torch.tensor([10, 900]), c)
        as_list = unet(x, torch.tensor([10, 900]), [c] * layers)
        as_fn = unet(x, torch.tensor([10, 900]), lambda i: c)
    assert torch.equal(one, as_list) and torch.equal(one, as_fn)


def test_per_layer_context_reaches_its_layer_and_is_checked(sd):
    unet, g = sd.unet, torch.Generator().manual_seed(1)
    names = cross_attention_layers(unet)
    contexts = [torch.randn(1, 77, 64, generator=g) for _ in names]
    spy = Spy(unet)
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8, generator=g), 5, contexts)
    spy.close()
    assert all(torch.equal(spy.seen[n], contexts[i]) for i, n in enumerate(names))
    with pytest.raises(ValueError, match="one tensor per cross-attention layer"):
        unet(torch.randn(1, 4, 8, 8), 5, contexts[:-1])
    with pytest.raises(ValueError, match="context must be"):
        unet(torch.randn(1, 4, 8, 8), 5, contexts[:-1] + [torch.randn(2, 77, 64)])


# ---------------------------------------------------------------------------------------------- P+

def test_per_layer_word_spy_matches_the_definition(sd):
    """The spy test: during one training loss, layer l cross-attends to c(y; v[k(t), l]) by hand."""
    tokenizer = copy.deepcopy(sd.tokenizer)
    g = torch.Generator().manual_seed(2)
    names = cross_attention_layers(sd.unet)
    T, n = 2, 2
    word = new_spacetime_word("per-layer", sd, tokenizer, "<pp>", torch.randn(n, 64, generator=g), num_buckets=T)
    with torch.no_grad():
        word.vectors.normal_(generator=g)  # every (bucket, layer) its own vectors
    ids = ids_with(sd, tokenizer, "<pp> <pp>_1", ["a photo of a {}", "{} on a blue background", "a {}"])
    t = torch.tensor([30, 700, 999])
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    calls = []
    handle = sd.text_encoder.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    spy = Spy(sd.unet)
    with torch.no_grad():
        diffusion_loss(sd.text_encoder, sd.unet, sd.scheduler, word, ids, latents, t, noise)
    spy.close(), handle.remove()
    assert calls == [torch.Size([len(names) * 3, 77, 64])], "one batched text-encoder call for all layers"
    table = token_table(sd.text_encoder)
    for l, name in enumerate(names):
        for i in range(3):
            k = int(t[i]) * T // 1000
            by_hand = sd.text_encoder(ids[i:i + 1], inputs_embeds=splice(ids[i:i + 1], table, word.token_ids,
                                                                         word.vectors[k, l].detach()))
            assert torch.allclose(spy.seen[name][i], by_hand[0], atol=1e-5), (name, i)


def test_per_layer_word_learns_and_differs_by_layer(sd):
    from minti import learn
    from minti.toy import TEMPLATES
    from minti.toy.evaluate import CONCEPTS_FOLDER
    word, losses = learn(sd, CONCEPTS_FOLDER + "/striped_orange_star", "<st>", "star", steps=3, batch=4, lr=5e-2,
                         templates=TEMPLATES, kind="per-layer")
    assert word.vectors.shape == (1, len(cross_attention_layers(sd.unet)), 1, 64)
    assert all(math.isfinite(x) for x in losses)
    assert not torch.equal(word.vectors[0, 0], word.vectors[0, -1]), "each layer gets its own gradient"


def test_a_neti_word_learned_twice_with_one_seed_is_the_same_word(sd):
    """learn(kind="neti", seed=s) gives one word whatever the global generator held before: the mapper's
    Linear layers start from it, so learn seeds it before building the word (it did not: two processes
    learned two different NeTI words from one seed)."""
    from minti import learn
    from minti.toy import TEMPLATES
    from minti.toy.evaluate import CONCEPTS_FOLDER
    words = []
    for before in (1, 2):
        torch.manual_seed(before)  # what a caller's earlier work left in the global generator
        word, _ = learn(sd, CONCEPTS_FOLDER + "/striped_orange_star", "<st>", "star", steps=2, batch=4, lr=5e-2,
                        templates=TEMPLATES, kind="neti", seed=0)
        words.append(word.state_dict())
    assert words[0].keys() == words[1].keys()
    assert all(torch.equal(words[0][k], words[1][k]) for k in words[0]), "same seed, different NeTI word"


def test_style_mixing_takes_layers_from_each_word():
    a, b = [torch.zeros(1)] * 4, [torch.ones(1)] * 4
    mixed = mix_layers(a, b, [False, True, False, True])
    assert [int(x) for x in torch.cat(mixed)] == [0, 1, 0, 1]


# ---------------------------------------------------------------------------------------------- NeTI

def neti_by_hand(mapper, t, layer, keep=None):
    """The mapper's definition written out from its weights alone (its state_dict), in plain tensor ops and
    float64: Fourier features of (t, l), a linear layer, twice Linear-LayerNorm-LeakyReLU, truncation to the
    first `keep` hidden dimensions, the output layer, the word's half rescaled to the mapper's norm."""
    w = {k: v.double() for k, v in mapper.state_dict().items()}
    phase = w["encode.w"] @ torch.tensor([float(t), float(layer)], dtype=torch.float64)  # (F,)
    enc = torch.cat([torch.sin(phase), torch.cos(phase)])
    h = w["net.0.weight"] @ (enc / enc.norm()) + w["net.0.bias"]  # similarities to the anchors
    for linear, norm in (("net.1", "net.2"), ("net.4", "net.5")):
        h = w[f"{linear}.weight"] @ h + w[f"{linear}.bias"]
        h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5)  # LayerNorm, torch's eps
        h = h * w[f"{norm}.weight"] + w[f"{norm}.bias"]
        h = torch.where(h > 0, h, 0.01 * h)  # LeakyReLU, torch's slope
    if keep is not None:
        h = torch.cat([h[:keep], torch.zeros(len(h) - keep, dtype=h.dtype)])
    out = w["output.weight"] @ h + w["output.bias"]
    word, bypass = out[:mapper.width], out[mapper.width:]
    return (word / word.norm() * mapper.norm).float(), bypass.float()


@pytest.mark.parametrize("t", [0, 250, 999])
@pytest.mark.parametrize("keep", [None, 1, 32, 128])
def test_neti_mapper_matches_its_definition(t, keep):
    torch.manual_seed(0)
    mapper = NeTIMapper(layers=7, width=64, norm=0.4)
    for layer in (0, 3, 6):
        word, bypass = mapper(torch.tensor([t]), torch.tensor([layer]),
                              None if keep is None else torch.tensor([keep]))
        w, b = neti_by_hand(mapper, t, layer, keep)
        # float32 against float64 (measured, worst of these 36 cases: word 6.7e-8, bypass 3.7e-7 on values up
        # to 0.9, norm 5.4e-8)
        torch.testing.assert_close(word[0], w, rtol=0, atol=2e-7)
        torch.testing.assert_close(bypass[0], b, rtol=0, atol=1e-6)
        assert abs(word[0].norm().item() - 0.4) < 2e-7


def test_neti_first_layer_starts_at_the_anchor_encodings():
    mapper = NeTIMapper(layers=3, width=8, norm=1.0, anchors=10)
    enc = mapper.encode(torch.tensor([100]), torch.tensor([2]))  # anchor (t=100, l=2): row 1*3 + 2
    assert torch.allclose(mapper.net[0].weight[5], enc[0])


@pytest.mark.parametrize("truncation", [None, 4, 64])
@pytest.mark.parametrize("bypass", [True, False])
def test_neti_context_matches_the_definition(sd, truncation, bypass):
    tokenizer = copy.deepcopy(sd.tokenizer)
    table = token_table(sd.text_encoder)
    start = table[tokenizer.encode("star")[1:2]].detach()
    torch.manual_seed(3)
    word = new_spacetime_word("neti", sd, tokenizer, "<nt>", start, bypass=bypass).eval()
    word.truncation = truncation
    ids = ids_with(sd, tokenizer, "<nt>", ["a photo of a {}", "a {} on a green background"])
    tm = sd.text_encoder.text_model
    for t in (0, 480, 999):
        with torch.no_grad():
            got = word.context(sd.text_encoder, ids, torch.tensor([t, t]))
            for l in range(len(word.layer_names)):
                v, b = neti_by_hand(word.mapper, t, l, truncation)
                h = tm.encoder(tm.embeddings(splice(ids, table, word.token_ids, v[None])))
                if bypass:
                    at = ids == word.token_ids[0]
                    h[at] = h[at] + BYPASS_ALPHA * b / b.norm() * h[at].norm(dim=-1, keepdim=True)
                assert torch.allclose(got[l], tm.final_layer_norm(h), atol=1e-5), (t, l)
    if not bypass:  # without the bypass, NeTI at one (t, l) is plain TI with that vector
        v, _ = neti_by_hand(word.mapper, 480, 2, truncation)
        plain = sd.text_encoder(ids, inputs_embeds=splice(ids, table, word.token_ids, v[None]))
        with torch.no_grad():
            assert torch.allclose(word.context(sd.text_encoder, ids, torch.tensor([480, 480]))[2], plain,
                                  atol=1e-5)


def test_nested_dropout_truncates_in_training_only():
    mapper = NeTIMapper(layers=2, width=8, norm=1.0, hidden=16)
    word = NeTIWord(mapper, [0], ["a", "b"], dropout_p=1.0, seed=0)
    keep = word.keep(5)
    assert keep is not None and keep.shape == (5,) and (keep < 16).all()
    word.eval()
    assert word.keep(5) is None
    word.truncation = 3
    assert word.keep(2).tolist() == [3, 3]


def test_sampling_conditioning_is_per_layer_and_per_step(sd):
    tokenizer = copy.deepcopy(sd.tokenizer)
    start = torch.randn(1, 64)
    pplus = new_spacetime_word("per-layer", sd, tokenizer, "<a1>", start)
    neti = new_spacetime_word("neti", sd, tokenizer, "<a2>", start).eval()
    fixed = sampling_conditioning(pplus, sd.text_encoder, ids_with(sd, tokenizer, "<a1>", ["a photo of a {}"]), n=2)
    ids = ids_with(sd, tokenizer, "<a2>", ["a photo of a {}"])
    assert isinstance(fixed, list) and len(fixed) == 7 and fixed[0].shape == (2, 77, 64)
    fn = sampling_conditioning(neti, sd.text_encoder, ids)
    assert not torch.equal(fn(torch.tensor(999))[0], fn(torch.tensor(0))[0])
    from minti.sampling import denoise, make_scheduler
    uncond = sd.text_encoder(tokenizer([""], length=77))
    with torch.no_grad():
        x = denoise(sd.unet, make_scheduler(sd.scheduler, "ddim", 3), torch.randn(1, 4, 8, 8), fn, uncond, 4.0)
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------- files

def pplus_concept(sd, T=2):
    tokenizer = copy.deepcopy(sd.tokenizer)
    word = new_spacetime_word("per-layer", sd, tokenizer, "<f1>", torch.randn(2, 64), num_buckets=T)
    with torch.no_grad():
        word.vectors.normal_()
    return word, from_word(word, "<f1>", step=7)


def test_per_layer_file_round_trip_and_exports(sd, tmp_path):
    word, concept = pplus_concept(sd)
    path = tmp_path / "w.safetensors"
    save_spacetime(path, concept)
    names = cross_attention_layers(sd.unet)
    back = load_spacetime(path, layer_names=names, width=64)
    assert back.kind == "per-layer" and back.token == "<f1>" and back.step == 7 and back.layer_names == names
    assert torch.equal(back.vectors, word.vectors.detach())
    again = make_word(back, copy.deepcopy(sd.tokenizer))
    assert isinstance(again, PerLayerWord) and torch.equal(again.vectors, word.vectors)
    avg = export_layer_average(back)
    assert avg.token == "<f1-layer-avg>" and torch.allclose(avg.vectors, word.vectors.detach().mean((0, 1)))
    one = export_layer(back, "mid_block.attentions.0")
    assert one.token == "<f1-mid_block.attentions.0>"
    assert torch.allclose(one.vectors, word.vectors.detach()[:, names.index("mid_block.attentions.0")].mean(0))
    with pytest.raises(ConceptError, match="space-time word"):
        load_concepts(path)


def test_neti_file_round_trip(sd, tmp_path):
    tokenizer = copy.deepcopy(sd.tokenizer)
    word = new_spacetime_word("neti", sd, tokenizer, "<f2>", torch.randn(1, 64), bypass=False).eval()
    path = tmp_path / "n.safetensors"
    save_spacetime(path, from_word(word, "<f2>", step=3))
    back = make_word(load_spacetime(path, cross_attention_layers(sd.unet), 64), copy.deepcopy(sd.tokenizer))
    assert isinstance(back, NeTIWord) and back.mapper.bypass is False
    t, layer = torch.tensor([100, 900]), torch.tensor([0, 6])
    assert all(torch.equal(a, b) for a, b in zip(word.mapper(t, layer)[:1], back.mapper(t, layer)[:1]))


def test_refusals(sd, tmp_path):
    _, concept = pplus_concept(sd)
    path = tmp_path / "w.safetensors"
    save_spacetime(path, concept)
    names = cross_attention_layers(sd.unet)
    with pytest.raises(ConceptError, match="7 cross-attention layers .* this model has 16"):
        with torch.device("meta"):
            sd15 = cross_attention_layers(UNet(UNetConfig()))
        load_spacetime(path, layer_names=sd15)
    with pytest.raises(ConceptError, match="width 64"):
        load_spacetime(path, layer_names=names, width=768)
    # a wrong layer count inside the file
    tensors, meta = safetensors.torch.load_file(path), safetensors.safe_open(path, "pt").metadata()
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"vectors": tensors["vectors"][:, :5].contiguous()}, bad, metadata=meta)
    with pytest.raises(ConceptError, match="5 layers but the metadata names 7"):
        load_spacetime(bad)
    safetensors.torch.save_file(tensors, bad, metadata={**meta, "width": "768"})
    with pytest.raises(ConceptError, match="width=768"):
        load_spacetime(bad)
    safetensors.torch.save_file(tensors, bad, metadata={**meta, "layers": "nonsense"})
    with pytest.raises(ConceptError, match="does not name the UNet layers"):
        load_spacetime(bad)
    # corrupt: cut off
    data = path.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(ConceptError, match="truncated|damaged"):
        load_spacetime(bad)
    # not a space-time file, and an unwritable word
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"<x>": torch.zeros(1, 64)}, plain, metadata={"format": "pt"})
    with pytest.raises(ConceptError, match="not a space-time word"):
        load_spacetime(plain)
    concept.vectors[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConceptError, match="NaN"):
        save_spacetime(tmp_path / "nan.safetensors", concept)


def test_neti_file_with_wrong_weights_is_refused(sd, tmp_path):
    tokenizer = copy.deepcopy(sd.tokenizer)
    word = new_spacetime_word("neti", sd, tokenizer, "<f3>", torch.randn(1, 64))
    concept = from_word(word, "<f3>")
    concept.meta["hidden"] = 64  # weights are 128 wide
    path = tmp_path / "n.safetensors"
    save_spacetime(path, concept)
    with pytest.raises(ConceptError, match="do not fit its metadata"):
        load_spacetime(path)


# ---------------------------------------------------------------------------------------------- CLIs

def _script(name):
    import importlib.util
    path = Path(__file__).resolve().parent.parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["--per-layer", "--neti"])
def test_train_writes_a_spacetime_file_that_sample_reads(kind, tmp_path):
    train, sample = _script("train"), _script("sample")
    out = tmp_path / "run"
    cfg = train.parse_args([kind, "--steps", "2", "--batch", "2", "--out", str(out), "--no-evaluate", "--token", "<w>"])
    written = {Path(f).name: f for f in train.train(cfg)["files"]}
    files = [written[f"w-{kind.strip('-')}.safetensors"]]
    concept = load_spacetime(files[0])
    assert concept.kind == kind.strip("-") and concept.step == 2
    if kind == "--per-layer":  # and the layer average, an ordinary diffusers word
        assert load_concepts(written["learned_embeds-layer-avg.safetensors"])[0].token == "<w-layer-avg>"
    truncation = ["--truncation", "8"] if kind == "--neti" else []  # (a P+ word refuses it: it has no mapper)
    images = sample.main(["--embeds", files[0], "--prompt", "a photo of a <w>", "--n", "2", "--steps", "3",
                          *truncation, "--out", str(tmp_path / "s.png"), "--no-progress"])
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(UsageError, match="samples alone"):  # sample.py's command line: exit 2, the message
        sample.main(["--embeds", files[0], files[0], "--out", str(tmp_path / "t.png")])
    if kind == "--neti":
        assert train.main([kind, "--vectors", "2", "--steps", "1", "--out", str(tmp_path / "r2")]) == 2


SPACETIME_RUN = ["--batch", "2", "--no-evaluate", "--token", "<w>", "--seed", "5", "--save-every", "2",
                 "--preview-every", "2"]


@pytest.mark.parametrize("kind", ["--per-layer", "--neti"])
def test_spacetime_run_resumes_bit_for_bit_with_snapshots_and_previews(kind, tmp_path):
    """Stopped at step 2 and resumed to 4 = 4 steps at once: the word's file is equal bit for bit (NeTI: its
    nested-dropout draws go on from the checkpoint); snapshots and previews are written as for TI."""
    train = _script("train")
    half, whole = tmp_path / "half", tmp_path / "whole"
    assert train.main([kind, *SPACETIME_RUN, "--steps", "2", "--out", str(half)]) == 0
    assert train.main(["--resume", str(half), "--steps", "4"]) == 0
    assert train.main([kind, *SPACETIME_RUN, "--steps", "4", "--out", str(whole)]) == 0
    name = f"w-{kind.strip('-')}.safetensors"
    a, b = safetensors.torch.load_file(half / name), safetensors.torch.load_file(whole / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_spacetime(half / "snapshots" / "step-000002" / name).step == 2
    assert (half / "previews" / "step-000004.png").is_file() and (whole / "previews" / "step-000002.png").is_file()
    assert (half / "log.csv").read_text().count("\n") == 5  # header + each step once


@pytest.mark.parametrize("kind, precision", [("--neti", "bf16"), ("--per-layer", "fp16")])
def test_spacetime_run_in_half_precision_keeps_an_fp32_word(kind, precision, tmp_path, monkeypatch):
    """The frozen UNet in bf16/fp16, fp16 with its loss scale, which took every step; the word and its file
    stay fp32 and finite; the first step's loss (the same batch, timesteps and noise) is the fp32 run's, to
    the precision's rounding."""
    train = _script("train")
    dtypes, forward = [], UNet.forward

    def recorded(self, *args, **kwargs):
        dtypes.append(self.conv_in.weight.dtype)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(UNet, "forward", recorded)
    first = {}
    for p in ("fp32", precision):
        out = tmp_path / p
        dtypes.clear()
        assert train.main([kind, *SPACETIME_RUN, "--precision", p, "--steps", "2", "--preview-every", "0",
                           "--out", str(out)]) == 0
        state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
        first[p] = state["log"][0][1]
    assert dtypes and set(dtypes) == {{"fp16": torch.float16, "bf16": torch.bfloat16}[precision]}
    assert all(math.isfinite(row[1]) for row in state["log"]), state["log"]
    if precision == "fp16":  # the scale as it started, grown towards its next doubling at both steps: none skipped
        assert (state["scaler"]["scale"], state["scaler"]["_growth_tracker"]) == (2.0 ** 16, 2), state["scaler"]
    else:
        assert state["scaler"] is None
    # measured: NeTI in bf16 8.6e-4, P+ in fp16 5.6e-4
    tolerance = {"bf16": 2e-3, "fp16": 1.5e-3}[precision]
    assert abs(first[precision] - first["fp32"]) <= tolerance * first["fp32"], first
    tensors = safetensors.torch.load_file(out / f"w-{kind.strip('-')}.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


def test_spacetime_run_from_a_word_file_and_refusals(sd, tmp_path, capsys):
    """--from a P+ file continues a P+ word; a file of the other kind, both kinds at once, and an adaptive
    timestep sampler (which reads one context's gradient) are refused with exit 2 and a message."""
    train = _script("train")
    tokenizer = copy.deepcopy(sd.tokenizer)
    word = new_spacetime_word("per-layer", sd, tokenizer, "<f1>", torch.randn(2, 64), num_buckets=2)
    path = tmp_path / "f1.safetensors"
    save_spacetime(path, from_word(word, "<f1>", step=9))
    out = tmp_path / "warm"
    assert train.main(["--per-layer", "--from", str(path), "--steps", "1", "--batch", "2", "--no-evaluate",
                       "--preview-every", "0", "--out", str(out)]) == 0
    assert "init: the per-layer word of" in capsys.readouterr().out
    assert load_spacetime(out / "f1-per-layer.safetensors").vectors.shape == word.vectors.shape
    for args, message in ((["--neti", "--from", str(path)], "is a per-layer word, but this run learns a neti"),
                          (["--from", str(path)], "is a space-time word (P+ / NeTI): continue it with"),
                          (["--per-layer", "--neti"], "two kinds of word"),
                          (["--neti", "--timesteps", "adaptive"], "gives each UNet layer its own")):
        assert train.main([*args, "--steps", "1", "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err, args


def test_neti_truncation_from_the_prompt_or_the_flag(sd, tmp_path):
    """`<name:K>` in a prompt = --truncation K for that prompt alone (the same images from the same noise);
    K = the mapper's width keeps everything (= no truncation); a cut that changes the word changes them."""
    sample = _script("sample")
    tokenizer = copy.deepcopy(sd.tokenizer)
    torch.manual_seed(3)
    word = new_spacetime_word("neti", sd, tokenizer, "<nt>", torch.randn(1, 64)).eval()
    with torch.no_grad():
        for p in word.mapper.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a word whose hidden dimensions all matter
    path = tmp_path / "nt.safetensors"
    save_spacetime(path, from_word(word, "<nt>"))
    run = ["--embeds", str(path), "--n", "2", "--steps", "3", "--no-progress", "--out", str(tmp_path / "x.png")]
    by_prompt = sample.main(run + ["--prompt", "a photo of a <nt:4>", "--prompt", "a <nt> on a blue background"])
    by_flag = sample.main(run + ["--truncation", "4", "--prompt", "a photo of a <nt>",
                                 "--prompt", f"a <nt:{word.mapper.hidden}> on a blue background"])
    whole = sample.main(run + ["--prompt", "a photo of a <nt>", "--prompt", "a <nt> on a blue background"])
    assert np.array_equal(by_prompt[:2], by_flag[:2]) and np.array_equal(by_prompt[2:], whole[2:])
    assert not np.array_equal(by_prompt[:2], whole[:2])
    with pytest.raises(UsageError, match="two truncations"):
        sample.main(run + ["--prompt", "<nt:4> and <nt:8>"])


def test_a_spacetime_run_on_the_toy_model_ends_with_the_oracle_on_the_word_itself(tmp_path, monkeypatch):
    """The closing evaluation of a P+ run draws with the per-layer word (not an ordinary stand-in): its
    samples equal those of the toy's ImageSampler for the file train.py wrote."""
    import json

    from minti.toy import world
    from minti.toy.evaluate import PREFIXES, ImageSampler, cycle, prompt, read_attributes, score_concept
    from minti.toy.oracle import Oracle

    train = _script("train")
    monkeypatch.setattr(train, "EVAL_SAMPLES", 4)
    out = tmp_path / "run"
    assert train.main(["--per-layer", "--steps", "2", "--batch", "2", "--preview-every", "0", "--token", "<w>",
                       "--out", str(out)]) == 0
    report = json.loads((out / "concept_eval.json").read_text())
    assert report["settings"]["n"] == 4 and report["settings"]["token"] == "<w>"
    sd = minti.load("toy")
    word = make_word(load_spacetime(out / "w-per-layer.safetensors"), sd.tokenizer)
    images = ImageSampler(sd, word, "<w>", sd.tokenizer, steps=train.EVAL_STEPS)(
        cycle([prompt(p, "<w>") for p in PREFIXES], 4), 0)
    read = read_attributes(Oracle.load(), images)
    expected = score_concept(read, world.CONCEPTS["striped_orange_star"])
    for attribute in ("colour", "pattern"):  # what the report read from its own samples, sample for sample
        assert report["shares"]["concept"][attribute]["hits"] == int(expected[attribute].sum()), attribute
    assert report["shares"]["concept"]["reconstruction"]["hits"] == int(expected["intact"].sum())
