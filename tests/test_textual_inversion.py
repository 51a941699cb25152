"""Textual inversion's step against diffusers' recipe, and what only minti promises.

Gradient parity: the same optimisation steps computed by minti (a [n, D] parameter spliced in through
inputs_embeds) and by diffusers' examples/textual_inversion recipe (transformers' CLIPTextModel with
the placeholder rows appended to its table, the whole table in AdamW, the other rows restored after
each step; diffusers' UNet2DConditionModel and DDPMScheduler), on a tiny random model with the same
weights and the same latents, timesteps and noise: loss, gradient and updated vectors agree within
1e-5 relative (fp32). Then: frozen weights stay bit-identical, every vector trains, multiresolution
buckets, the per-sample gradient norms handed to the timestep sampler, and the init words.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minti.io.tokenizer_files import read_clip_bpe
from minti.clip import CLIPTextConfig, CLIPTextModel

from minti.io.prompt_syntax import Word
from minti.multires import resolve
from minti.schedulers import DDPM
from minti.textual_inversion import (AutoStop, LearnedWord, NonFiniteLoss, check_new_word, diffusion_loss, init_vectors,
                                     splice, token_table, train_loop, train_step)
from minti.timesteps import UniformTimesteps
from minti.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

import diffusers  # noqa: E402
import transformers  # noqa: E402

TOL = 1e-5  # max |minti - reference| / max |reference|, fp32
V = 1000  # vocabulary of the tiny text encoder; placeholders get the ids V, V+1, ...
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77)
# Every block type SD 1.x has, small: cross-attention at two of three levels, in the mid block too.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
ADAMW = dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def rel_err(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


@torch.no_grad()
def perturb(model):
    """Make every tensor distinct (LayerNorm weights all 1 would hide a mix-up)."""
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model


def frozen(*modules):
    for m in modules:
        m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models():
    """A tiny reference (transformers + diffusers) and minti's copy of it, weight for weight."""
    torch.manual_seed(0)
    n_new = 3  # room for up to three placeholder rows in the reference's table
    ref_te = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=V + n_new, hidden_act="quick_gelu", bos_token_id=V - 2, eos_token_id=V - 1, **TEXT)))
    ref_unet = perturb(diffusers.UNet2DConditionModel(**UNET))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=V, bos_token_id=V - 2, eos_token_id=V - 1, **TEXT))
    state = {(k if k.startswith("text_model.") else "text_model." + k): v  # transformers 5 drops the prefix
             for k, v in ref_te.state_dict().items() if not k.endswith("position_ids")}
    table = "text_model.embeddings.token_embedding.weight"
    state[table] = state[table][:V]  # minti's table: the vocabulary; the placeholders live beside it
    te.load_state_dict(state, strict=True)
    unet = UNet(UNetConfig(**UNET))
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    frozen(te, unet, ref_unet)
    return dict(te=te, unet=unet, ref_te=ref_te, ref_unet=ref_unet, n_new=n_new)


def prompts(placeholders, B=3, L=77):
    """Token ids [B, L]: start, some words, the placeholders at a different place in each prompt, end,
    then end-token padding (as SD 1.x pads)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(B):
        words = torch.randint(0, V - 2, (3 + 2 * i,), generator=g).tolist()
        at = 1 + i
        row = [V - 2] + words[:at] + list(placeholders) + words[at:] + [V - 1]
        rows.append(row + [V - 1] * (L - len(row)))
    return torch.tensor(rows)


def fixed_batch(B=3, placeholders=(V, V + 1)):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990, 250, 750, 3][:B])  # several different timesteps in one batch
    noise = torch.randn(B, 4, 8, 8, generator=g)
    return prompts(placeholders, B), latents, t, noise


def reference_steps(models, init, ids, latents, t, noise, steps):
    """diffusers' examples/textual_inversion step, written out: the placeholder rows appended to the
    table, the whole table trainable in AdamW, the other rows restored after each step."""
    ref_te, ref_unet = models["ref_te"], models["ref_unet"]
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    embeddings = ref_te.get_input_embeddings()
    n = init.shape[0]
    with torch.no_grad():
        embeddings.weight[V:V + n] = init
    original = embeddings.weight.detach().clone()
    ref_te.requires_grad_(False)
    embeddings.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(embeddings.parameters(), **ADAMW)
    keep = torch.ones(embeddings.weight.shape[0], dtype=torch.bool)
    keep[V:V + n] = False
    out = []
    try:
        for _ in range(steps):
            context = ref_te(ids)[0]
            noisy = scheduler.add_noise(latents, noise, t)
            pred = ref_unet(noisy, t, context).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            grad = embeddings.weight.grad[V:V + n].clone()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                embeddings.weight[keep] = original[keep]
            out.append((loss.item(), grad, embeddings.weight[V:V + n].detach().clone()))
    finally:
        with torch.no_grad():
            embeddings.weight.copy_(original)
        embeddings.weight.requires_grad_(False)
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_gradient_parity_with_diffusers_recipe(models, n):
    torch.manual_seed(3)
    init = 0.5 * torch.randn(n, TEXT["hidden_size"])
    ids, latents, t, noise = fixed_batch(3, placeholders=range(V, V + n))
    expected = reference_steps(models, init, ids, latents, t, noise, steps=3)

    word = LearnedWord(init, list(range(V, V + n)))
    optimizer = torch.optim.AdamW([word.vectors], **ADAMW)
    for step, (ref_loss, ref_grad, ref_vectors) in enumerate(expected):
        loss = train_step(models["te"], models["unet"], DDPM(), word, optimizer, [(ids, latents, t, noise)])
        assert abs(loss - ref_loss) / abs(ref_loss) < TOL, step
        assert rel_err(word.vectors.grad[0], ref_grad) < TOL, step
        assert rel_err(word.vectors.detach()[0], ref_vectors) < TOL, step
        assert not torch.equal(word.vectors.detach()[0], init)


def snapshot(*modules):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def test_only_the_vectors_change_and_every_vector_trains(models):
    te, unet = models["te"], models["unet"]
    before = snapshot(te, unet)
    n = 3
    word = LearnedWord(0.5 * torch.randn(n, TEXT["hidden_size"]), list(range(V, V + n)))
    start = word.vectors.detach().clone()
    # A large weight decay: under diffusers' recipe it would shrink every row of the table.
    optimizer = torch.optim.AdamW([word.vectors], lr=0.1, weight_decay=0.5)
    ids, latents, t, noise = fixed_batch(3, placeholders=range(V, V + n))
    for _ in range(3):
        train_step(te, unet, DDPM(), word, optimizer, [(ids, latents, t, noise)])
        grad_per_vector = word.vectors.grad[0].abs().sum(dim=-1)
        assert (grad_per_vector > 0).all(), grad_per_vector  # every one of the n vectors is taught
    assert (word.vectors.detach() != start).all(dim=-1).all()  # and every one moved
    for ours, then in zip(snapshot(te, unet), before):
        assert ours.keys() == then.keys()
        for key in then:
            assert torch.equal(ours[key], then[key]), key  # bit-identical, the token table included
    assert [p for m in (te, unet) for p in m.parameters() if p.grad is not None] == []  # no weight gradient


def accumulated_and_whole(te, unet, K, b, dtype):
    """train_step over K micro-batches of b samples, and over the same K*b samples in one batch: (loss,
    gradient, vectors after the step, the timestep sampler's readings) for each."""
    ids, latents, t, noise = fixed_batch(K * b)
    latents, noise = latents.to(dtype), noise.to(dtype)
    init = 0.5 * torch.randn(2, TEXT["hidden_size"], generator=torch.Generator().manual_seed(6))
    micro = [tuple(x[k * b:(k + 1) * b] for x in (ids, latents, t, noise)) for k in range(K)]
    results = []
    for batches in (micro, [(ids, latents, t, noise)]):
        word, sampler = LearnedWord(init, [V, V + 1]), RecordingSampler()
        loss = train_step(te, unet, DDPM(), word, torch.optim.AdamW([word.vectors], **ADAMW), batches, sampler)
        readings = torch.cat([g for _, g in sampler.updates])
        results.append((loss, word.vectors.grad.clone(), word.vectors.detach().clone(), readings))
        assert not torch.equal(word.vectors.detach()[0], init)
    return results


def test_gradient_accumulation_equals_one_big_batch(models):
    """grad_accum=K micro-batches of b samples (train.py --grad-accum) = one batch of K*b with the same
    draws: the same loss, gradient, step and timestep-sampler readings within 1e-6 relative.

    The frozen model runs in fp64 for the 1e-6 comparison (the vectors, their gradient and AdamW stay
    fp32, as in training): in fp32 each way is ~5e-7 from the fp64 gradient (kernels that depend on the
    batch size round differently), so their difference (4e-7 to 9e-7 measured) sits at the bound itself.
    The fp32 run is checked too, within 10x that rounding."""
    K, b = 3, 2
    te64, unet64 = (copy.deepcopy(m).double() for m in (models["te"], models["unet"]))
    for (loss_k, grad_k, after_k, g_k), (loss_1, grad_1, after_1, g_1), tol in [
            (*accumulated_and_whole(te64, unet64, K, b, torch.float64), 1e-6),
            (*accumulated_and_whole(models["te"], models["unet"], K, b, torch.float32), 1e-5)]:
        assert abs(loss_k - loss_1) / abs(loss_1) < tol
        assert rel_err(grad_k, grad_1) < tol
        assert rel_err(after_k, after_1) < tol
        assert rel_err(g_k, g_1) < tol


def test_non_finite_loss_stops_without_touching_the_vectors(models):
    word = LearnedWord(torch.randn(1, TEXT["hidden_size"]), [V])
    start = word.vectors.detach().clone()
    optimizer = torch.optim.AdamW([word.vectors], **ADAMW)
    ids, latents, t, noise = fixed_batch(2, placeholders=[V])
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="not finite"):
        train_step(models["te"], models["unet"], DDPM(), word, optimizer, [(ids, latents, t, noise)])
    assert torch.equal(word.vectors.detach(), start)


# ----------------------------------------------------------------------------------------------
# Multiresolution: per-sample buckets

@pytest.mark.parametrize("T", [1, 3, 7, 10])
def test_bucket_of_every_timestep_matches_sampling_side(T):
    word = LearnedWord(torch.zeros(T, 1, 4), [V])
    t = torch.arange(1000)
    buckets = word.bucket(t)
    assert buckets.tolist() == [t_ * T // 1000 for t_ in range(1000)]  # floor(t * T / 1000)
    # the sampling side (a prompt's <word>, multires.resolve) picks the same word for every timestep
    assert buckets.tolist() == [resolve(Word("w", "fully", 0.0, 0, 3), t_, T) for t_ in range(1000)]


class RecordingUNet(nn.Module):
    """Stands in for the UNet: remembers the context of each call; its output depends on it."""

    def __init__(self):
        super().__init__()
        self.contexts = []

    def forward(self, x, t, context):
        self.contexts.append(context.detach().clone())
        return x + context.mean(dim=(1, 2))[:, None, None, None]


def test_each_sample_is_conditioned_on_the_word_of_its_own_timestep(models):
    te = models["te"]
    T, n, D = 10, 2, TEXT["hidden_size"]
    word = LearnedWord(torch.randn(T, n, D), [V, V + 1])  # ten clearly different words
    t = torch.tensor([0, 99, 100, 555, 999, 950])
    assert word.bucket(t).tolist() == [0, 0, 1, 5, 9, 9]
    ids, latents, _, noise = fixed_batch(6, placeholders=[V, V + 1])
    unet = RecordingUNet()
    loss, _ = diffusion_loss(te, unet, DDPM(), word, ids, latents, t, noise)
    (seen,) = unet.contexts
    table = token_table(te)
    for i, k in enumerate([0, 0, 1, 5, 9, 9]):  # sample i, alone, with bucket k's vectors
        alone = te(ids[i:i + 1], inputs_embeds=splice(ids[i:i + 1], table, [V, V + 1], word.vectors[k]))
        assert torch.allclose(seen[i], alone[0], atol=1e-6), i
        wrong = word.vectors[(k + 1) % T]
        other = te(ids[i:i + 1], inputs_embeds=splice(ids[i:i + 1], table, [V, V + 1], wrong))
        assert not torch.allclose(seen[i], other[0], atol=1e-3), i
    loss.backward()
    taught = word.vectors.grad.abs().sum(dim=(1, 2)) > 0
    assert taught.nonzero().flatten().tolist() == [0, 1, 5, 9]  # only the buckets in the batch


# ----------------------------------------------------------------------------------------------
# The gradient norms handed to the timestep sampler

class RecordingSampler(UniformTimesteps):
    wants_grad_norms = True

    def __init__(self):
        super().__init__()
        self.updates = []

    def update(self, t, g):
        self.updates.append((t.clone(), g.clone()))


def test_grad_norm_hook_equals_per_sample_autograd(models):
    te, unet, ddpm = models["te"], models["unet"], DDPM()
    word = LearnedWord(0.5 * torch.randn(2, TEXT["hidden_size"]), [V, V + 1])
    ids, latents, t, noise = fixed_batch(3, placeholders=[V, V + 1])
    g = torch.Generator().manual_seed(4)
    second = (ids.flip(0), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([700, 20, 400]),
              torch.randn(3, 4, 8, 8, generator=g))
    batches = [(ids, latents, t, noise), second]  # two micro-batches: gradient accumulation

    table = token_table(te)
    expected = []
    for ids_, lat, t_, eps in batches:  # sample by sample, each alone, before the vectors move
        for i in range(len(t_)):
            c = te(ids_[i:i + 1], inputs_embeds=word(ids_[i:i + 1], table, t_[i:i + 1]))
            c = c.detach().requires_grad_()
            pred = unet(ddpm.add_noise(lat[i:i + 1], eps[i:i + 1], t_[i:i + 1]), t_[i:i + 1], c)
            (grad,) = torch.autograd.grad(F.mse_loss(pred, eps[i:i + 1]), c)
            expected.append(grad.norm().item())

    sampler = RecordingSampler()
    optimizer = torch.optim.AdamW([word.vectors], **ADAMW)
    train_step(te, unet, ddpm, word, optimizer, batches, timestep_sampler=sampler)
    assert [u[0].tolist() for u in sampler.updates] == [b[2].tolist() for b in batches]
    got = torch.cat([u[1] for u in sampler.updates])
    assert rel_err(got, torch.tensor(expected)) < TOL


# ----------------------------------------------------------------------------------------------
# Init words and placeholder checks (CLIP's real vocabulary)

@pytest.fixture(scope="module")
def clip_tok(clip_bpe_path):
    return read_clip_bpe(clip_bpe_path)


@pytest.fixture(scope="module")
def table():
    return torch.randn(49408, 8, generator=torch.Generator().manual_seed(5))


def row(tok, table, piece):
    return table[tok.token_to_id(piece)]


def test_init_single_word(clip_tok, table):
    v, message = init_vectors(clip_tok, table, "cat", 1)
    assert torch.equal(v, row(clip_tok, table, "cat</w>")[None]) and "copied" in message
    v, message = init_vectors(clip_tok, table, "cat", 3)
    assert torch.equal(v, row(clip_tok, table, "cat</w>").expand(3, -1)) and "all 3 vectors" in message


def test_init_word_that_bpe_splits(clip_tok, table):
    cat, dog = row(clip_tok, table, "cat"), row(clip_tok, table, "dog</w>")  # "catdog" = cat + dog</w>
    v, message = init_vectors(clip_tok, table, "catdog", 2)
    assert torch.equal(v, torch.stack([cat, dog])) and "one token per vector" in message
    v, message = init_vectors(clip_tok, table, "catdog", 1)
    assert torch.allclose(v[0], (cat + dog) / 2) and "average of its 2 tokens" in message
    assert "'catdog' = cat + dog</w>" in message


def test_init_several_words(clip_tok, table):
    red, star = row(clip_tok, table, "red</w>"), row(clip_tok, table, "star</w>")
    v, message = init_vectors(clip_tok, table, "red star", 2)
    assert torch.equal(v, torch.stack([red, star]))
    catdog = (row(clip_tok, table, "cat") + row(clip_tok, table, "dog</w>")) / 2
    v, message = init_vectors(clip_tok, table, "red, catdog", 2)  # 3 tokens, 2 words, 2 vectors
    assert torch.allclose(v, torch.stack([red, catdog])) and "one word per vector" in message
    v, message = init_vectors(clip_tok, table, "red star", 3)  # 2 tokens, 2 words, 3 vectors
    assert torch.allclose(v, ((red + star) / 2).expand(3, -1)) and "average" in message


@pytest.mark.parametrize("init, error", [("", "empty"), ("  ,", "empty"), ("xqzv", "unknown to this vocabulary"),
                                         ("cat qxjz", "mostly single letters"), ("qxjzvar", r"q \+ x \+ j \+ z \+ var,")])
def test_init_refuses_empty_and_unknown_words(clip_tok, table, init, error):
    with pytest.raises(ValueError, match=error):
        init_vectors(clip_tok, table, init, 1)


def test_init_refuses_a_placeholder(clip_tok, table):
    tok = copy.deepcopy(clip_tok)
    tok.add_tokens(["<other>"])
    with pytest.raises(ValueError, match="no row in the model's token table"):
        init_vectors(tok, table, "<other>", 1)


def test_placeholder_must_be_a_new_word(clip_tok):
    with pytest.raises(ValueError, match="already a word of the vocabulary"):
        check_new_word(clip_tok, "cat")
    check_new_word(clip_tok, "<cat>")  # fine: BPE cuts it into pieces, it is no word yet


# ----------------------------------------------------------------------------------------------
# fp16 weights with a gradient scaler (train.py --precision fp16)

def halved(*modules):
    return [copy.deepcopy(m).half() for m in modules]


def reference_grad(te, unet, init, ids, latents, t, noise, scale=1.0):
    """d loss / d placeholder rows through transformers + diffusers (the recipe's table), loss x scale
    before backward and divided out after, as a GradScaler does."""
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    embeddings = te.get_input_embeddings()
    n = init.shape[0]
    with torch.no_grad():
        embeddings.weight[V:V + n] = init.to(embeddings.weight.dtype)
    embeddings.weight.requires_grad_(True)
    try:
        context = te(ids)[0]
        noisy = scheduler.add_noise(latents, noise, t).to(unet.dtype)
        pred = unet(noisy, t, context).sample
        (F.mse_loss(pred.float(), noise.float()) * scale).backward()
        return embeddings.weight.grad[V:V + n].float() / scale
    finally:
        embeddings.weight.requires_grad_(False)
        embeddings.weight.grad = None


def test_fp16_step_with_grad_scaler_matches_fp32_within_fp16_error(models):
    """A fresh GradScaler (its scale made lazily by scale()), one fp16 step against the fp32 step. The
    bound: 2x the error of the same fp16 computation through transformers + diffusers."""
    torch.manual_seed(4)
    init = 0.5 * torch.randn(2, TEXT["hidden_size"])
    placeholders = [V, V + 1]
    ids, latents, t, noise = fixed_batch(3, placeholders=placeholders)
    te16, unet16 = halved(models["te"], models["unet"])

    word32 = LearnedWord(init, placeholders)
    train_step(models["te"], models["unet"], DDPM(), word32, torch.optim.AdamW([word32.vectors], **ADAMW),
               [(ids, latents, t, noise)])
    word16 = LearnedWord(init, placeholders)
    scaler = torch.amp.GradScaler("cpu")
    loss = train_step(te16, unet16, DDPM(), word16, torch.optim.AdamW([word16.vectors], **ADAMW),
                      [(ids, latents, t, noise)], scaler=scaler)
    assert math.isfinite(loss) and scaler.get_scale() == 2.0 ** 16  # not skipped: no overflow here
    assert word16.vectors.dtype == torch.float32 and word16.vectors.grad.dtype == torch.float32

    ref32 = reference_grad(models["ref_te"], models["ref_unet"], init, ids, latents, t, noise)
    ref_te16, ref_unet16 = halved(models["ref_te"], models["ref_unet"])
    ref16 = reference_grad(ref_te16, ref_unet16, init, ids, latents, t, noise, scale=2.0 ** 16)
    assert rel_err(word32.vectors.grad[0], ref32) < TOL  # the two fp32 gradients agree (as above)
    reference_error = rel_err(ref16, ref32)
    assert 0 < reference_error < 0.05  # fp16 really ran, and the reference is sane
    assert rel_err(word16.vectors.grad[0], word32.vectors.grad[0]) <= 2 * reference_error
    assert not torch.equal(word16.vectors.detach(), init[None])  # the step was taken
    # AdamW's first step moves each number by about lr x sign(grad): equal wherever the sign agrees
    moved = (word16.vectors.detach() - word32.vectors.detach()).abs()
    assert (moved <= 2 * ADAMW["lr"]).all() and (moved < 1e-6).float().mean() > 0.95


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(models):
    """A loss scale so large that the fp16 backward overflows: the scaler skips the step (the vectors do
    not move, no NonFiniteLoss) and halves its scale, as torch.amp documents."""
    te16, unet16 = halved(models["te"], models["unet"])
    init = 0.5 * torch.randn(1, TEXT["hidden_size"])
    word = LearnedWord(init, [V])
    optimizer = torch.optim.AdamW([word.vectors], **ADAMW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    ids, latents, t, noise = fixed_batch(2, placeholders=[V])
    loss = train_step(te16, unet16, DDPM(), word, optimizer, [(ids, latents, t, noise)], scaler=scaler)
    assert math.isfinite(loss)
    assert torch.equal(word.vectors.detach(), init[None])
    assert scaler.get_scale() == 2.0 ** 39
    assert optimizer.state == {} or all(s.get("step", 0) == 0 for s in optimizer.state.values())


def test_finite_loss_with_non_finite_gradient_stops_without_touching_the_vectors(models):
    word = LearnedWord(torch.randn(1, TEXT["hidden_size"]), [V])
    start = word.vectors.detach().clone()
    word.vectors.register_hook(lambda grad: grad * float("inf"))  # e.g. an attention back-end overflowing
    optimizer = torch.optim.AdamW([word.vectors], **ADAMW)
    ids, latents, t, noise = fixed_batch(2, placeholders=[V])
    with pytest.raises(NonFiniteLoss, match="the gradient is not finite"):
        train_step(models["te"], models["unet"], DDPM(), word, optimizer, [(ids, latents, t, noise)])
    assert torch.equal(word.vectors.detach(), start)


# ----------------------------------------------------------------------------------------------
# The levers for fewer steps: CrossInit's start and pull, DTI's fixed norm, DVAR's automatic stop

def reference_gradient(models, vectors, ids, latents, t, noise):
    """The recipe's loss and its gradient w.r.t. the placeholder rows, the rows set to `vectors` [n, D]."""
    ref_te, ref_unet, n = models["ref_te"], models["ref_unet"], vectors.shape[0]
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    weight = ref_te.get_input_embeddings().weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[V:V + n] = vectors
        weight.requires_grad_(True)
        pred = ref_unet(scheduler.add_noise(latents, noise, t), t, ref_te(ids)[0]).sample
        loss = F.mse_loss(pred.float(), noise.float())
        (grad,) = torch.autograd.grad(loss, weight)
        return loss.item(), grad[V:V + n]
    finally:
        weight.requires_grad_(False)
        with torch.no_grad():
            weight.copy_(original)


@pytest.mark.parametrize("pull, norm", [(0.3, None), (0.0, 1.7), (0.3, 1.7)])
def test_pull_and_fixed_norm_steps_match_a_hand_written_reference(models, pull, norm):
    """The reference: the recipe's gradient, plus pull x d mean||v - start|| / dv, projected on the sphere's
    tangent for a fixed norm, one AdamW step, then (fixed norm) v / ||v|| x norm. Three steps, tol 1e-5."""
    n, batch = 2, fixed_batch(3, placeholders=(V, V + 1))
    start = 0.5 * torch.randn(n, TEXT["hidden_size"], generator=torch.Generator().manual_seed(7))
    init = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(8))
    word = LearnedWord(init, [V, V + 1], pull=pull, start=start, norm=norm)
    optimizer = torch.optim.AdamW([word.vectors], **ADAMW)
    ref = torch.nn.Parameter(F.normalize(init, dim=-1) * norm if norm else init.clone())
    ref_optimizer = torch.optim.AdamW([ref], **ADAMW)
    for step in range(3):
        ref_loss, grad = reference_gradient(models, ref.detach(), *batch)
        v = ref.detach().clone().requires_grad_(True)
        (pulled,) = torch.autograd.grad(pull * (v - start).norm(dim=-1).mean(), v)
        grad = grad + pulled
        if norm:
            u = F.normalize(ref.detach(), dim=-1)
            grad = grad - (grad * u).sum(-1, keepdim=True) * u
        ref.grad = grad
        ref_optimizer.step()
        if norm:
            with torch.no_grad():
                ref.copy_(F.normalize(ref, dim=-1) * norm)
        loss = train_step(models["te"], models["unet"], DDPM(), word, optimizer, [batch])
        assert abs(loss - ref_loss) / abs(ref_loss) < TOL, step  # the logged loss is the diffusion loss alone
        assert rel_err(word.vectors.detach()[0], ref.detach()) < TOL, step
    if norm:
        assert torch.allclose(word.vectors.detach().norm(dim=-1), torch.full((1, n), norm), rtol=1e-6)
    assert not torch.allclose(word.vectors.detach()[0], init, atol=1e-4)  # the word learned


def test_crossinit_start_is_the_reference_encoders_output_at_the_word(models):
    """init_vectors(text_encoder=...): each piece's vector is transformers' last hidden state (after the final
    LayerNorm) at its place in "<start> words <end>"; the one-to-many rules stay those of the table start."""
    class Pieces:  # a tokenizer stand-in: each word one piece (its id), two pieces for "two-piece"
        bos_id, eos_id, id_to_token = V - 2, V - 1, {i: f"w{i}" for i in range(V)}

        def encode(self, word):
            ids = [11, 12] if word == "two-piece" else [int(word[1:])]
            return [self.bos_id, *ids, self.eos_id]
    te, ref_te, table = models["te"], models["ref_te"], token_table(models["te"])
    expected = ref_te(torch.tensor([[V - 2, 5, 11, 12, V - 1]]))[0][0, 1:-1]
    vectors, message = init_vectors(Pieces(), table, "w5 two-piece", 3, text_encoder=te)
    assert rel_err(vectors, expected) < TOL and "one token per vector" in message
    vectors, _ = init_vectors(Pieces(), table, "w5 two-piece", 2, text_encoder=te)  # one word per vector
    assert rel_err(vectors, torch.stack([expected[0], expected[1:].mean(0)])) < TOL
    vectors, _ = init_vectors(Pieces(), table, "w5", 1)  # without an encoder: the table's row, as before
    assert torch.equal(vectors[0], table[5])


def test_autostop_ratio_fires_and_resumes_at_the_same_step(models):
    """AutoStop: var(last window) / var(all) (population variances, as numpy), 1 before a window exists; a run
    stopped by it, and the same run interrupted, saved and resumed, stop at the same step."""
    import numpy as np

    stop = AutoStop([], window=4, threshold=0.2)
    stop.losses = [5.0, 3.0, 2.0]
    assert stop.ratio() == 1.0
    stop.losses += [1.0, 1.01, 0.99, 1.0]
    assert abs(stop.ratio() - np.var(stop.losses[-4:]) / np.var(stop.losses)) < 1e-12

    class Data:  # ConceptData's interface: a batch of (ids, latents), every draw from the generator
        def batch(self, size, generator):
            i = torch.randint(0, 3, (size,), generator=generator)
            ids, latents, _, _ = fixed_batch(3)
            return ids[i], latents[i]

    class SD:
        text_encoder, unet, scheduler = models["te"], models["unet"], DDPM()

    def run(steps, state=None):
        init = 0.5 * torch.randn(2, TEXT["hidden_size"], generator=torch.Generator().manual_seed(9))
        word = LearnedWord(init, [V, V + 1])
        optimizer, generator = torch.optim.AdamW([word.vectors], lr=0.05), torch.Generator().manual_seed(0)
        stop = AutoStop.drawn(Data(), 0, 2, 1000, "cpu", window=8, threshold=0.25)
        start = 0
        if state is not None:
            word.load_state_dict(state["word"]), optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"]), stop.load_state_dict(state["stop"])
            start = state["step"]
        losses = train_loop(SD(), word, Data(), optimizer, UniformTimesteps(), generator, steps=steps, lr=0.05,
                            start=start, batch=2, stop=stop)
        return getattr(stop, "step", None), losses, dict(word=word.state_dict(), optimizer=optimizer.state_dict(),
                                                         generator=generator.get_state(), stop=stop.state_dict(),
                                                         step=start + len(losses))
    whole_step, whole_losses, _ = run(60)
    assert whole_step is not None and 8 < whole_step < 60, whole_step  # neither at once nor never
    first_step, first_losses, state = run(whole_step - 3)  # interrupted 3 steps before the stop (the ceiling), then resumed
    assert first_step is None
    resumed_step, resumed_losses, _ = run(60, state)
    assert resumed_step == whole_step and first_losses + resumed_losses == whole_losses
