"""Multiresolution words during sampling: the context the UNet receives at every step of a real run.

A spy wraps a tiny random minti UNet and records the context of each call while minti.sampling's loop
(text_to_image, DDIM, 20 and 50 steps, with and without guidance, several prompts x n images) runs
with the conditioning that minti/multires.py builds. Each recorded context is checked against the paper's
three definitions computed here independently: the bucket in exact fractions, the token vectors of the
expected prompt assembled by hand (BOS, the text's own tokens, the concept's vectors or none or zeros,
EOS padding) and passed through the text encoder. A counting wrapper counts text-encoder calls. Then,
without the UNet: every pair of modes of two concepts at timesteps around each t_fixed, for both drops,
and a prompt longer than 77 tokens (SD's truncation, also checked against the tokenizer's own).
"""
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from minti.toy.bpe import train_bpe
from minti.clip import CLIPTextConfig, CLIPTextModel
from minti.io.concepts import Concept
from minti.io.prompt_syntax import PromptWords
from minti.io.prompt_syntax import expand_prompt
from minti.sampling import encode_prompts, text_to_image
from minti.schedulers import DDIM, DDPM
from minti.tokenizer import Tokenizer
from minti.unet import UNet, UNetConfig
from minti.vae import VAE, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

WIDTH = 32  # text width = the UNet's cross_attention_dim
LENGTH = 77  # SD 1.x's context length: every prompt is padded to it
# fp32; the same encoder on the same vectors, batched differently (a row alone or among others).
TOL = dict(rtol=1e-5, atol=1e-5)
CAPTIONS = ["a photo of a cat made with paint on a table", "a painting of a dog next to a box, blurry"]
NEGATIVE = "blurry"


class SpyUNet(torch.nn.Module):
    """A UNet that records (timestep, context) of every call, then runs the real one."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.calls = unet, unet.config, []

    dtype = property(lambda self: self.unet.dtype)
    device = property(lambda self: self.unet.device)

    def forward(self, x, t, context):
        self.calls.append((int(t), context.clone()))
        return self.unet(x, t, context)


class CountingEncoder(torch.nn.Module):
    """A text encoder that counts its calls and the rows it encodes."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.config, self.text_model = encoder, encoder.config, encoder.text_model
        self.calls = self.rows = 0

    def forward(self, ids=None, inputs_embeds=None):
        self.calls += 1
        self.rows += len(ids if ids is not None else inputs_embeds)
        return self.encoder(ids, inputs_embeds=inputs_embeds)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tok = train_bpe(CAPTIONS, 600)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=LENGTH, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id)).eval()
    unet = UNet(UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
                           cross_attention_dim=WIDTH, norm_num_groups=4, sample_size=8,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))).eval()
    vae = VAE(VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)).eval()  # 2x down
    concepts = {  # two multires words of different T and vector counts, and a plain two-vector word
        "cat": Concept("<cat>", torch.randn(10, 2, WIDTH)),
        "jane": Concept("jane", torch.randn(4, 1, WIDTH)),  # an A1111-style token without brackets
        "dog": Concept("<dog>", torch.randn(2, WIDTH)),
    }
    return SimpleNamespace(vocab=tok.vocab, merges=tok.merges, encoder=encoder, unet=unet, vae=vae,
                           concepts=concepts)


def fresh_tokenizer(models):
    return Tokenizer(models.vocab, models.merges)


# ---------------------------------------------------------------------------------- expectations

def expected_vectors(concept: Concept, mode: str, t_fixed: str, tau: int, drop: str):
    """The paper's definitions, in exact fractions: the word's vectors at timestep tau, or None (cut out)."""
    vectors = concept.vectors if concept.is_multires else concept.vectors[None]  # a plain word has T = 1
    T = vectors.shape[0]
    t, tf = Fraction(tau, 1000), Fraction(t_fixed)

    def bucket(x):
        return min(math.floor(x * T), T - 1)

    if mode == "fixed":
        return vectors[bucket(tf)]
    if t >= tf:
        return vectors[bucket(t)]
    if mode == "fully":
        return vectors[bucket(tf)]
    return None if drop == "remove" else torch.zeros_like(vectors[0])  # semi, below t_fixed


def written(spec) -> str:
    """The prompt string of a spec: text pieces and (name, mode, t_fixed) words."""
    form = {"fixed": "<{}|{}|>", "semi": "<{}({})>", "fully": "<{}[{}]>", "bare": "<{}>"}
    return "".join(p if isinstance(p, str) else form[p[1]].format(p[0], p[2]) for p in spec)


def by_hand(models, tok, pieces, truncate=False):
    """Encode a prompt given as text pieces and [n, D] vector blocks: BOS, tokens, vectors, EOS, padding.
    truncate: a longer prompt is cut as SD 1.x's tokenizer cuts it, to its first 76 tokens and EOS."""
    table = models.encoder.text_model.embeddings.token_embedding.weight
    rows = [table[[tok.bos_id]]]
    for piece in pieces:
        rows.append(table[tok.encode(piece)[1:-1]] if isinstance(piece, str) else piece)
    rows.append(table[[tok.eos_id]])
    rows = torch.cat(rows)
    if truncate and len(rows) > LENGTH:
        rows = torch.cat([rows[:LENGTH - 1], table[[tok.eos_id]]])
    assert len(rows) <= LENGTH, "keep test prompts short enough to need no truncation"
    rows = torch.cat([rows, table[[tok.eos_id] * (LENGTH - len(rows))]])
    with torch.no_grad():
        return models.encoder(None, inputs_embeds=rows[None])[0]


class Expected:
    """The expected conditional context of a spec at each timestep, and its distinct states."""

    def __init__(self, models, tok, spec, drop="remove", truncate=False):
        self.models, self.tok, self.spec, self.drop, self.cache = models, tok, spec, drop, {}
        self.truncate = truncate

    def state(self, tau):
        out = []
        for p in self.spec:
            if isinstance(p, str):
                out.append(p)
                continue
            name, mode, t_fixed = p
            mode, t_fixed = ("fully", "0") if mode == "bare" else (mode, t_fixed)
            out.append(expected_vectors(self.models.concepts[name], mode, t_fixed, tau, self.drop))
        return out

    def key(self, tau):
        return tuple(p if isinstance(p, str) else (None if p is None else tuple(p.flatten()[:3].tolist()))
                     for p in self.state(tau))

    def __call__(self, tau):
        key = self.key(tau)
        if key not in self.cache:
            self.cache[key] = by_hand(self.models, self.tok, [p for p in self.state(tau) if p is not None],
                                      self.truncate)
        return self.cache[key]


def sample(models, tok, prompts, context_fn, steps, guidance, n, embed_fn=None):
    spy = SpyUNet(models.unet)
    sd = SimpleNamespace(tokenizer=tok, text_encoder=models.encoder, unet=spy, vae=models.vae,
                         scheduler=DDPM(), latent_scale=0.18215)
    fn = context_fn if callable(context_fn) else (lambda t: context_fn)

    def cond(t):  # [P, L, D] -> [P * n, L, D]: each prompt's row for its n images
        return fn(t).repeat_interleave(n, dim=0)
    with torch.no_grad():
        images = text_to_image(sd, prompts, negative=NEGATIVE, num_steps=steps, guidance_scale=guidance, n=n,
                               width=16, height=16, cond=cond, embed_fn=embed_fn, output="pt")
    assert images.shape == (len(prompts) * n, 3, 16, 16) and torch.isfinite(images).all()
    assert [t for t, _ in spy.calls] == DDIM(DDPM(), steps).timesteps.tolist()
    return spy.calls


def check_contexts(calls, expectations, n, guided, uncond=None):
    """Every step's context: uncond half (if guided) and each prompt's n rows of the conditional half."""
    rows = len(expectations) * n
    for tau, context in calls:
        assert context.shape == ((2 if guided else 1) * rows, LENGTH, WIDTH)
        if guided:
            for row in context[:rows]:
                torch.testing.assert_close(row, uncond, **TOL)
        cond = context[rows:] if guided else context
        for i, expected in enumerate(expectations):
            for row in cond[i * n:(i + 1) * n]:
                torch.testing.assert_close(row, expected(tau), **TOL, msg=lambda m: f"timestep {tau}: {m}")


def assert_distinguishable(expected, taus):
    """The check can fail: contexts of different states differ far beyond the tolerance."""
    contexts = list({expected.key(tau): expected(tau) for tau in taus}.values())
    for i in range(len(contexts)):
        for j in range(i):
            assert (contexts[i] - contexts[j]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("steps, guidance", [(20, 1.0), (50, 7.5)])
@pytest.mark.parametrize("t_fixed", ["0", "0.3", ".5", "1"])
def test_every_step_gets_the_three_definitions(models, t_fixed, steps, guidance):
    """All forms of a word at once, several words of one concept in one prompt, a plain concept,
    two prompts x 2 images; the contexts the UNet gets equal the definitions at every step."""
    tok = fresh_tokenizer(models)
    specs = [
        ["a photo of ", ("cat", "fixed", t_fixed), " next to ", ("dog", "semi", "0.3"), " on a table"],
        [("cat", "semi", t_fixed), " and ", ("cat", "fully", t_fixed), " with ", ("cat", "bare", ""),
         ", ", ("dog", "bare", ""), " in a box"],
    ]
    words = PromptWords(list(models.concepts.values()), tok, models.encoder)
    timesteps = DDIM(DDPM(), steps).timesteps
    # n=1: sample() repeats each prompt's row for its n images.
    context_fn = words.conditioning([written(s) for s in specs], timesteps=timesteps)
    calls = sample(models, tok, [written(s) for s in specs], context_fn, steps, guidance, n=2,
                   embed_fn=words.embed_fn)
    expectations = [Expected(models, tok, s) for s in specs]
    check_contexts(calls, expectations, n=2, guided=guidance != 1, uncond=by_hand(models, tok, [NEGATIVE]))
    if t_fixed == ".5":
        assert_distinguishable(expectations[1], timesteps.tolist())


@pytest.mark.parametrize("drop", ["remove", "zero"])
@pytest.mark.parametrize("steps, guidance", [(20, 1.0), (50, 7.5)])
def test_two_concepts_at_two_resolutions(models, drop, steps, guidance):
    """The paper's example: <cat(0.5)> (semi) and <jane|0.1|> (fixed; jane has T = 4, so bucket 0)."""
    tok = fresh_tokenizer(models)
    spec = ["A photo of ", ("cat", "semi", "0.5"), " made with ", ("jane", "fixed", "0.1")]
    assert written(spec) == "A photo of <cat(0.5)> made with <jane|0.1|>"
    counting = CountingEncoder(models.encoder)
    words = PromptWords(list(models.concepts.values()), tok, counting)
    timesteps = DDIM(DDPM(), steps).timesteps
    context_fn = words.conditioning(written(spec), timesteps=timesteps, drop=drop)
    expected = Expected(models, tok, spec, drop)
    distinct = len({expected.key(tau) for tau in timesteps.tolist()})
    assert distinct == 6  # cat's buckets 5..9, and below 0.5 the cut-out (or zero) word
    assert counting.calls <= distinct and counting.rows == distinct  # each conditioning encoded once, now
    calls = sample(models, tok, [written(spec)], context_fn, steps, guidance, n=1, embed_fn=words.embed_fn)
    assert counting.rows == distinct  # and none during sampling
    check_contexts(calls, [expected], n=1, guided=guidance != 1, uncond=by_hand(models, tok, [NEGATIVE]))
    assert_distinguishable(expected, timesteps.tolist())


def test_a_cut_out_word_leaves_the_prompt_without_it(models):
    """Below t_fixed, `<cat(0.5)>` conditions exactly as the prompt with the word deleted."""
    tok = fresh_tokenizer(models)
    prompt = "A photo of <cat(0.5)> on a table"
    context_fn = PromptWords(list(models.concepts.values()), tok, models.encoder).conditioning(
        prompt, timesteps=DDIM(DDPM(), 20).timesteps)
    without = encode_prompts(tok, models.encoder, ["A photo of on a table"])[0]  # no learned word at all
    calls = sample(models, tok, [prompt], context_fn, 20, 1.0, n=1)
    low = [context for tau, context in calls if tau < 500]
    high = [context for tau, context in calls if tau >= 500]
    assert len(low) == 10 and len(high) == 10
    for context in low:
        torch.testing.assert_close(context[0], without, **TOL)
    for context in high:
        assert (context[0] - without).abs().max() > 1e-2


def test_encoder_runs_once_per_distinct_conditioning(models):
    """50 steps, T = 10: at most 10 encodings per prompt, whether built up front or on first use."""
    concepts = list(models.concepts.values())
    prompts = ["a <cat> on a table", "a painting of <cat[0.3]> next to <jane(0.6)>"]
    specs = [["a ", ("cat", "bare", ""), " on a table"],
             ["a painting of ", ("cat", "fully", "0.3"), " next to ", ("jane", "semi", "0.6")]]
    assert [written(s) for s in specs] == prompts
    timesteps = DDIM(DDPM(), 50).timesteps
    tok = fresh_tokenizer(models)
    expected = [Expected(models, tok, s) for s in specs]
    distinct = [len({e.key(tau) for tau in timesteps.tolist()}) for e in expected]
    # <cat>: buckets 0..9. <cat[0.3]> x <jane(0.6)> (T = 4): cat 3, 4, 5 with no jane below t = 0.6, then
    # (6, 2), (7, 2) up to 0.75, (7, 3), (8, 3), (9, 3).
    assert distinct == [10, 8]
    for eager in (True, False):
        counting = CountingEncoder(models.encoder)
        context_fn = PromptWords(concepts, tok, counting).conditioning(prompts, timesteps=timesteps if eager else None)
        assert counting.calls == (1 if eager else 0)
        calls = sample(models, tok, prompts, context_fn, 50, 1.0, n=1)
        assert counting.calls <= sum(distinct) and counting.rows == sum(distinct)
        check_contexts(calls, expected, n=1, guided=False)


@pytest.mark.parametrize("prompt, spec", [
    ("a red star on a blue background", ["a red star on a blue background"]),
    ("a photo of <dog> on a table", ["a photo of ", ("dog", "bare", ""), " on a table"]),
    ("a <cat|0.3|> and <jane|1|>", ["a ", ("cat", "fixed", "0.3"), " and ", ("jane", "fixed", "1")]),
])
def test_time_independent_prompts_are_encoded_once(models, prompt, spec):
    """Plain text, plain concepts, fixed resolutions: one encoder call, a fixed tensor, no work per step."""
    tok = fresh_tokenizer(models)
    assert written(spec) == prompt
    counting = CountingEncoder(models.encoder)
    context = PromptWords(list(models.concepts.values()), tok, counting).conditioning(
        prompt, timesteps=DDIM(DDPM(), 20).timesteps, n=3)
    assert torch.is_tensor(context) and context.shape == (3, LENGTH, WIDTH)
    assert counting.calls == 1 and counting.rows == 1
    calls = sample(models, tok, [prompt], context[:1], 20, 7.5, n=3)
    assert counting.calls == 1
    uncond = by_hand(models, tok, [NEGATIVE])
    check_contexts(calls, [Expected(models, tok, spec)], n=3, guided=True, uncond=uncond)


TAUS = [999, 901, 760, 740, 601, 600, 599, 450, 449, 300, 101, 1, 0]  # around every t_fixed used below


@pytest.mark.parametrize("drop", ["remove", "zero"])
@pytest.mark.parametrize("cat_mode", ["fixed", "semi", "fully"])
@pytest.mark.parametrize("jane_mode", ["fixed", "semi", "fully"])
def test_every_pair_of_modes_of_two_concepts(models, cat_mode, jane_mode, drop):
    """Two words of different concepts (T = 10 with 2 vectors, T = 4 with 1) in every pair of modes, at
    timesteps on both sides of each t_fixed: the conditioning equals the definitions, for both drops."""
    tok = fresh_tokenizer(models)
    spec = ["a photo of ", ("cat", cat_mode, "0.45"), " made with ", ("jane", jane_mode, "0.6"), " on a table"]
    words = PromptWords(list(models.concepts.values()), tok, models.encoder)
    context = words.conditioning(written(spec), drop=drop)
    assert callable(context) == (cat_mode != "fixed" or jane_mode != "fixed")
    expected = Expected(models, tok, spec, drop)
    for tau in TAUS:
        got = context(tau) if callable(context) else context
        torch.testing.assert_close(got[0], expected(tau), **TOL, msg=lambda m: f"timestep {tau}: {m}")
    assert_distinguishable(expected, TAUS)


@pytest.mark.parametrize("drop", ["remove", "zero"])
def test_a_prompt_longer_than_77_tokens(models, drop):
    """Truncation as SD 1.x: the first 76 tokens, then the end token. Words are cut like any text: below
    t = 0.5 the semi word <cat(0.5)> near the start is removed (drop="remove") and the tokens after it move
    up two places, so the second vector of <cat[0.3]>, cut at position 76 while the first word is there,
    comes back in; with drop="zero" the first word keeps its place and the second stays cut. A word past
    position 76 (<jane(0)> here) never reaches the text encoder: whatever its bucket, nothing changes."""
    tok = fresh_tokenizer(models)
    prefix = len(tok.encode("a photo of")) - 2
    filler = " ".join(["a"] * (72 - prefix))  # <cat[0.3]> then stands at positions 75 and 76
    assert len(tok.encode(filler)) - 2 == 72 - prefix
    spec = ["a photo of ", ("cat", "semi", "0.5"), " " + filler + " ", ("cat", "fully", "0.3"), " and ",
            ("jane", "semi", "0"), " on a table"]
    words = PromptWords(list(models.concepts.values()), tok, models.encoder)
    context_fn = words.conditioning(written(spec), drop=drop)
    expected = Expected(models, tok, spec, drop, truncate=True)
    for tau in TAUS:
        torch.testing.assert_close(context_fn(tau)[0], expected(tau), **TOL,
                                   msg=lambda m: f"timestep {tau}: {m}")
    cat = models.concepts["cat"].vectors
    start = ["a photo of ", cat[7], " " + filler + " "]  # at tau = 760 and 740: <cat(0.5)> uses bucket 7
    torch.testing.assert_close(context_fn(760)[0], by_hand(models, tok, start + [cat[7][:1]]), **TOL)
    # Below 0.5: without the first word, <cat[0.3]> (bucket 4 at tau 450) is whole, and "and" begins after
    # it (cut too: the tiny vocabulary spells it in several tokens); with zeros, the word is still cut.
    below = ["a photo of ", " " + filler + " ", cat[4], " and"] if drop == "remove" else (
        ["a photo of ", torch.zeros(2, WIDTH), " " + filler + " ", cat[4][:1]])
    torch.testing.assert_close(context_fn(450)[0], by_hand(models, tok, below, truncate=True), **TOL)
    # <jane(0)> uses bucket 2 at tau 740 and bucket 3 at 760; everything else is the same: so is the context.
    assert expected.key(740) != expected.key(760) and torch.equal(expected(740), expected(760))
    torch.testing.assert_close(context_fn(740), context_fn(760), rtol=1e-6, atol=1e-6)
    assert (context_fn(760) - context_fn(450)).abs().max() > 1e-3


def test_a_long_prompt_is_truncated_as_the_tokenizer_truncates(models):
    """The same truncation through the tokenizer: each word at the bucket of one step written as a plain
    word, tok(text, length=77), splice, encode (sampling.encode_prompts); here with the long prompt above."""
    tok = fresh_tokenizer(models)
    prefix = len(tok.encode("a photo of")) - 2
    filler = " ".join(["a"] * (72 - prefix))
    words = PromptWords(list(models.concepts.values()), tok, models.encoder)
    prompt = f"a photo of <cat(0.5)> {filler} <cat[0.3]> and <jane(0)> on a table"
    cat, jane = models.concepts["cat"].vectors, models.concepts["jane"].vectors
    plain = PromptWords([Concept("<c7>", cat[7]), Concept("<j3>", jane[3])], fresh_tokenizer(models),
                        models.encoder)
    text = expand_prompt(f"a photo of <c7> {filler} <c7> and <j3> on a table", plain.plain)  # <c7> <c7>_1
    with torch.no_grad():
        reference = encode_prompts(plain.tokenizer, models.encoder, [text], plain.embed_fn)
    torch.testing.assert_close(words.conditioning(prompt)(760), reference, **TOL)
