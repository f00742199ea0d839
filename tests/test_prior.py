"""The autoregressive code prior: causality, key/value cache, sampling and its devices, filters, overfitting, sizes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from raydae.config import load_config
from raydae.errors import UserError
from raydae.models.prior import PRIOR_MODELS, CodePrior, build_prior, filter_logits
from raydae.tasks import make_task

VOCAB, SEQ_LEN, CLASSES = 32, 12, 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not thrash when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_prior(num_classes: int = 0, seed: int = 0) -> CodePrior:
    """prior-T with weights scaled up from the 0.02 init, so logits are O(1) and tests are sharp."""
    torch.manual_seed(seed)
    prior = build_prior("prior-T", VOCAB, SEQ_LEN, num_classes=num_classes).eval()
    with torch.no_grad():
        for name, param in prior.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.15 if param.dim() > 1 else 0.1)
    return prior


def codes(batch: int, length: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def labels_for(num_classes: int, batch: int):
    return torch.arange(batch) % num_classes if num_classes else None


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("num_classes", [0, CLASSES])
@pytest.mark.parametrize("length", [1, 5, SEQ_LEN])
def test_logits_shape(num_classes, length):
    prior = tiny_prior(num_classes)
    logits = prior(codes(3, length), labels_for(num_classes, 3))
    assert logits.shape == (3, length, VOCAB)
    assert torch.isfinite(logits).all()
    loss = prior.loss(codes(3, length), labels_for(num_classes, 3))
    assert loss.dim() == 0 and loss.item() > 0


@pytest.mark.parametrize("num_classes", [0, CLASSES])
def test_causality(num_classes):
    prior = tiny_prior(num_classes)
    indices = codes(2)
    y = labels_for(num_classes, 2)
    base = prior(indices, y)
    for j in [0, 4, SEQ_LEN - 1]:
        changed = indices.clone()
        changed[:, j] = (changed[:, j] + 7) % VOCAB
        out = prior(changed, y)
        # logits[:, i] only see indices[:, :i], so token j cannot reach positions <= j ...
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], atol=1e-6, rtol=0)
        # ... and does reach position j + 1 (a model that ignored its input would pass the line above).
        if j + 1 < SEQ_LEN:
            assert (out[:, j + 1] - base[:, j + 1]).abs().max() > 1e-3


def test_class_conditioning_changes_logits():
    prior = tiny_prior(CLASSES)
    indices = codes(1).expand(3, -1)
    logits = prior(indices, torch.tensor([0, 1, CLASSES]))
    assert (logits[0] - logits[1]).abs().max() > 1e-2
    assert (logits[0] - logits[2]).abs().max() > 1e-2
    # y=None is the null class, index num_classes.
    torch.testing.assert_close(prior(indices[:1]), logits[2:3])
    torch.testing.assert_close(prior(indices[:1], 1), logits[1:2])  # an int label is broadcast


def test_bad_inputs_raise():
    unconditional, conditional = tiny_prior(0), tiny_prior(CLASSES)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(codes(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="seq_len"):
        unconditional(codes(2, SEQ_LEN + 1))
    with pytest.raises(ValueError, match="labels"):
        conditional(codes(2), torch.tensor([0, CLASSES + 1]))
    with pytest.raises(ValueError, match="long"):
        unconditional(codes(2).float())


def test_config_rebuilds_the_model():
    prior = tiny_prior(CLASSES)
    clone = CodePrior(**prior.config).eval()
    clone.load_state_dict(prior.state_dict())
    torch.testing.assert_close(clone(codes(2), torch.tensor([1, 2])), prior(codes(2), torch.tensor([1, 2])))


# ------------------------------------------------------------------------------- key/value cache
@pytest.mark.parametrize("num_classes", [0, CLASSES])
def test_cached_logits_equal_uncached(num_classes):
    prior = tiny_prior(num_classes)
    indices = codes(3)
    y = labels_for(num_classes, 3)
    with torch.no_grad():
        full = prior(indices, y)
    cached = prior.step_logits(indices, y)
    assert full.abs().max() > 1.0  # logits are not trivially near zero
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_cache_accepts_several_tokens_after_a_prefix():
    """The masked branch: a chunk of new tokens after a cached prefix, as in prompt-then-sample."""
    prior = tiny_prior(CLASSES)
    indices, y = codes(2), torch.tensor([3, 0])
    with torch.no_grad():
        full = prior(indices, y)
        inputs = prior._embed_prefix(indices[:, :-1], y)
        cache = prior.new_cache()
        first = prior._logits(inputs[:, :5], cache)
        rest = prior._logits(inputs[:, 5:], cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_classes", [0, CLASSES])
def test_generate_is_seeded_and_cache_independent(num_classes):
    prior = tiny_prior(num_classes)
    y = labels_for(num_classes, 4)

    def sample(seed, use_cache, **kwargs):
        gen = torch.Generator().manual_seed(seed)
        return prior.generate(4, y, generator=gen, use_cache=use_cache, **kwargs)

    cached = sample(0, True)
    assert cached.shape == (4, SEQ_LEN) and cached.dtype == torch.long
    assert cached.min() >= 0 and cached.max() < VOCAB
    assert torch.equal(cached, sample(0, False))
    assert torch.equal(cached, sample(0, True))
    assert not torch.equal(cached, sample(1, True))
    filtered = sample(2, True, top_k=5, top_p=0.9, temperature=0.8)
    assert torch.equal(filtered, sample(2, False, top_k=5, top_p=0.9, temperature=0.8))


@pytest.mark.parametrize("use_cache", [True, False])
def test_temperature_zero_is_greedy(use_cache):
    prior = tiny_prior(CLASSES)
    y = torch.tensor([0, 4])
    greedy = prior.generate(2, y, temperature=0.0, use_cache=use_cache)
    with torch.no_grad():
        logits = prior(greedy, y)
    assert torch.equal(logits.argmax(dim=-1), greedy)  # every code is the argmax given its prefix
    # A tiny temperature samples the same sequences: the distribution collapses onto the argmax.
    cold = prior.generate(2, y, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)
    with pytest.raises(ValueError, match="temperature"):
        prior.generate(2, y, temperature=-1.0)


def test_sampler_draws_from_the_filtered_softmax():
    """Frequencies of 40 000 draws match softmax(logits / temperature) over the codes the filters keep."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40_000, -1)

    def frequencies(temperature, top_k=0):
        draws = CodePrior._sample(logits, temperature, top_k, 1.0, torch.Generator().manual_seed(0))
        return torch.bincount(draws, minlength=4) / draws.numel()

    torch.testing.assert_close(frequencies(1.0), probs, atol=0.01, rtol=0)  # 4 standard errors
    torch.testing.assert_close(frequencies(2.0), probs.sqrt() / probs.sqrt().sum(), atol=0.01, rtol=0)
    torch.testing.assert_close(frequencies(1.0, top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)


# ------------------------------------------------------------------------------- sampling devices
@pytest.fixture
def generator_device_rule(monkeypatch):
    """CUDA's rule, enforced on the CPU: a torch.Generator draws only tensors on its own device.

    Covers the free functions raydae draws with; yields (generator device, tensor device) per seeded draw.
    The `meta` device then stands in for a GPU: a CPU generator that feeds it directly fails, as on CUDA.
    """
    draws = []

    def enforce(original, device_of):
        def draw(*args, generator=None, **kwargs):
            if generator is not None:
                device = torch.device(device_of(args, kwargs))
                draws.append((generator.device, device))
                if device != generator.device:
                    raise RuntimeError(f"a {generator.device} generator cannot draw a tensor on {device}")
            return original(*args, generator=generator, **kwargs)

        return draw

    monkeypatch.setattr(torch, "multinomial", enforce(torch.multinomial, lambda args, kwargs: args[0].device))
    for name in ("rand", "randn", "randint"):
        device_kwarg = enforce(getattr(torch, name), lambda args, kwargs: kwargs.get("device") or "cpu")
        monkeypatch.setattr(torch, name, device_kwarg)
    return draws


@pytest.mark.parametrize("num_classes", [0, CLASSES])
def test_generate_on_another_device_draws_on_the_generators(generator_device_rule, num_classes):
    """Issue 16: a CPU generator drives a prior that lives elsewhere (meta here, CUDA in a run)."""
    prior = tiny_prior(num_classes).to("meta")
    sampled = prior.generate(3, generator=torch.Generator().manual_seed(0), top_k=5, top_p=0.9)
    assert sampled.device.type == "meta" and sampled.shape == (3, SEQ_LEN) and sampled.dtype == torch.long
    cpu = torch.device("cpu")
    assert generator_device_rule and set(generator_device_rule) == {(cpu, cpu)}  # every draw came from the seed


def test_prior_task_samples_off_the_cpu(generator_device_rule):
    """PriorTask.sample (samples.png, `raydae sample`, evaluation) seeds a CPU generator whatever its device."""
    config = load_config("tiny", overrides=["ae.bottleneck=vq", "generator=vq_prior", "prior.model=prior-T"])
    task = make_task(config, "generator", {"latent_shape": [2, 8, 8], "num_classes": 5})
    task.prepare(torch.device("meta"))
    images = task.sample(2, seed=3)
    assert images.device.type == "meta" and images.shape == (2, 3, 16, 16)
    assert generator_device_rule  # the codes came from the seeded generator, not the global RNG


def test_generate_refuses_a_device_the_prior_is_not_on():
    with pytest.raises(ValueError, match="weights are on cpu"):
        tiny_prior().generate(2, device="meta")


# ------------------------------------------------------------------------------- filter_logits
def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    assert kept(filter_logits(logits, top_k=2)) == [1, 2]
    assert kept(filter_logits(logits, top_k=1)) == [1]
    out = filter_logits(logits, top_k=3)
    assert torch.equal(out[[0, 1, 2]], logits[[0, 1, 2]])  # kept logits are unchanged
    assert torch.isneginf(out[[3, 4]]).all()
    assert torch.equal(filter_logits(logits, top_k=0), logits)  # off
    assert torch.equal(filter_logits(logits, top_k=10), logits)  # k >= vocab: nothing to drop
    # Ties with the k-th largest are all kept (no arbitrary choice among equally likely tokens).
    assert kept(filter_logits(torch.tensor([1.0, 2.0, 2.0, 0.0]), top_k=1)) == [1, 2]
    # Batched: each row keeps its own top k.
    rows = filter_logits(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), top_k=1)
    assert torch.isfinite(rows).nonzero().tolist() == [[0, 2], [1, 0]]


def test_top_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    assert kept(filter_logits(logits, top_p=0.4)) == [1]  # 0.5 alone reaches 0.4
    assert kept(filter_logits(logits, top_p=0.7)) == [1, 3]  # 0.5 + 0.3 = 0.8 >= 0.7
    assert kept(filter_logits(logits, top_p=0.9)) == [0, 1, 3]  # 0.95 >= 0.9
    assert kept(filter_logits(logits, top_p=0.99)) == [0, 1, 2, 3]
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)  # off
    # A tiny top_p keeps exactly the argmax, also when the two largest tie.
    assert kept(filter_logits(logits, top_p=1e-9)) == [1]
    assert len(kept(filter_logits(torch.tensor([2.0, 2.0, 0.0]), top_p=1e-9))) == 1
    # Shift invariance: only the softmax matters.
    assert kept(filter_logits(logits + 100.0, top_p=0.7)) == [1, 3]


def test_top_k_then_top_p():
    logits = torch.tensor([0.25, 0.25, 0.2, 0.2, 0.1]).log()
    # top_k=4 drops 0.1; renormalised the rest are 5/18, 5/18, 4/18, 4/18: 10/18 >= 0.5.
    assert kept(filter_logits(logits, top_k=4, top_p=0.5)) == [0, 1]
    for bad in [dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            filter_logits(logits, **bad)


# ------------------------------------------------------------------------------- training
def test_tiny_prior_overfits_a_fixed_batch():
    """prior-T memorises 8 labelled code sequences: next-token cross-entropy falls at least 10x in
    100 steps (under 1 s on one CPU core; it starts near ln(32) = 3.47 nats and ends near 0.05)."""
    torch.manual_seed(0)
    prior = build_prior("prior-T", VOCAB, SEQ_LEN, num_classes=CLASSES)
    indices, y = codes(8, seed=3), torch.arange(8) % CLASSES
    optimizer = torch.optim.AdamW(prior.parameters(), lr=5e-3, weight_decay=0.0)
    first = prior.loss(indices, y).item()
    assert abs(first - math.log(VOCAB)) < 0.2  # the 0.02 init predicts a near-uniform distribution
    for _ in range(100):
        loss = prior.loss(indices, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = prior.loss(indices, y).item()
    assert final < first / 10, (first, final)
    # The loss helper is the flattened cross-entropy of forward's logits.
    logits = prior(indices, y)
    torch.testing.assert_close(
        F.cross_entropy(logits.reshape(-1, VOCAB), indices.reshape(-1)), prior.loss(indices, y)
    )


# ------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name,depth,width", [("prior-T", 2, 64), ("prior-S", 4, 128)])
def test_tiny_sizes_build(name, depth, width):
    prior = build_prior(name, VOCAB, SEQ_LEN, num_classes=CLASSES, dropout=0.1)
    assert len(prior.blocks) == depth and prior.token_embed.embedding_dim == width
    assert prior.config["dropout"] == 0.1 and prior.config["num_classes"] == CLASSES


def test_published_sizes_on_meta_device():
    """Large sizes are built without memory; prior-XL at taming's ImageNet shape is ~1.4B parameters."""
    with torch.device("meta"):
        counts = {
            name: sum(p.numel() for p in build_prior(name, 16384, 256, num_classes=1000).parameters())
            for name in ["prior-B", "prior-L", "prior-XL"]
        }
    assert counts["prior-B"] < counts["prior-L"] < counts["prior-XL"]
    assert 1.3e9 < counts["prior-XL"] < 1.5e9, counts
    assert set(PRIOR_MODELS) == {"prior-T", "prior-S", "prior-B", "prior-L", "prior-XL"}


def test_unknown_name_raises_user_error():
    with pytest.raises(UserError, match="prior-T.*prior-XL"):
        build_prior("prior-XXL", VOCAB, SEQ_LEN)
