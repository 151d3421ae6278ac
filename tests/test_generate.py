"""Generation: the cache loop against full re-runs, sampling, stopping, expert counts, progress."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

from d2m_ref import forward
from d2m_ref.config import parse_config
from d2m_ref.demo import DEMO_SEED, demo_config
from d2m_ref.errors import InputError
from d2m_ref.errors import NonFiniteError
from d2m_ref.generate import first_non_finite, generate, nucleus_size, sample
from d2m_ref.progress import Progress, status_line, terminal_progress
from d2m_ref.synth import model_from_arrays, random_arrays, random_model

PROMPT = np.array([84, 104, 101, 32, 99, 97, 112])  # "The cap"


@pytest.fixture(scope="module")
def model():
    return random_model(parse_config(demo_config()), DEMO_SEED, "BF16")


def test_greedy_equals_argmax_of_full_reruns(model):
    """Each greedy token is the argmax of a cache-free forward over prompt + the tokens before it."""
    result = generate(model, PROMPT, max_new_tokens=6)
    assert result.new_ids.size == 6 and result.stop_reason == "max_new_tokens"
    for j, token in enumerate(result.new_ids):
        logits, _ = forward(model, np.concatenate([PROMPT, result.new_ids[:j]]))
        assert token == int(np.argmax(logits[-1])), f"step {j}"


def test_expert_counts_match_a_full_forward(model):
    """Counts equal the topk_ids of one forward over every token that went through the model,
    and each MoE layer's counts sum to tokens x top_k."""
    result = generate(model, PROMPT, max_new_tokens=5)
    seen = np.concatenate([PROMPT, result.new_ids[:-1]])  # the last token is sampled, never fed back
    assert result.tokens_processed == seen.size == PROMPT.size + result.decode_steps
    capture = {}
    forward(model, seen, capture=capture)
    assert sorted(result.expert_counts) == [1, 2, 3]
    for i, counts in result.expert_counts.items():
        moe = model.config.layers[i].moe
        assert counts.sum() == seen.size * moe.top_k
        np.testing.assert_array_equal(counts, np.bincount(capture[f"topk_ids.{i}"].ravel(), minlength=moe.num_experts))


def test_sampling_is_reproducible_with_a_seed(model):
    """Same seed, same tokens; another seed, other tokens (temperature 1 over 257 ids)."""
    a = generate(model, PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    b = generate(model, PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    c = generate(model, PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=8)
    assert a.new_ids.tolist() == b.new_ids.tolist()
    assert a.new_ids.tolist() != c.new_ids.tolist()


def test_tiny_top_p_is_greedy(model):
    """A nucleus of one token is the argmax, whatever the temperature and seed."""
    greedy = generate(model, PROMPT, max_new_tokens=6)
    tiny = generate(model, PROMPT, max_new_tokens=6, temperature=2.0, top_p=1e-9, seed=3)
    assert tiny.new_ids.tolist() == greedy.new_ids.tolist()


def test_float32_generation_runs(model):
    """float32 compute gives a continuation of the asked length (the cache keeps float32)."""
    result = generate(model, PROMPT, max_new_tokens=3, dtype=np.float32)
    assert result.new_ids.size == 3


def test_greedy_ties_take_the_lowest_id():
    logits = np.array([0.0, 3.0, 1.0, 3.0])
    assert sample(logits, None, 1.0, np.random.default_rng(0)) == 1
    assert sample(logits, 0.0, 1.0, np.random.default_rng(0)) == 1
    assert sample(logits, 1.0, 1e-12, np.random.default_rng(0)) == 1


def test_nucleus_keeps_the_fewest_tokens_reaching_top_p():
    probs = np.array([0.5, 0.3, 0.2])
    assert [nucleus_size(probs, p) for p in (0.1, 0.5, 0.51, 0.8, 0.81, 1.0)] == [1, 1, 2, 2, 3, 3]


def test_nucleus_sampling_frequencies():
    """top_p=0.75 over probabilities (.5, .3, .2) draws ids 0, 1 in ratio .625 : .375, never id 2."""
    logits = np.log(np.array([0.2, 0.5, 0.3]))  # ids 1, 2, 0 in order of probability
    rng = np.random.default_rng(0)
    draws = np.array([sample(logits, 1.0, 0.75, rng) for _ in range(4000)])
    assert not np.any(draws == 0)
    assert abs(np.mean(draws == 1) - 0.625) < 0.03


def test_stops_at_eos(model):
    """An EOS id ends the continuation right after it is produced."""
    first = int(generate(model, PROMPT, max_new_tokens=1).new_ids[0])
    result = generate(model, PROMPT, max_new_tokens=10, eos_ids=[first])
    assert result.new_ids.tolist() == [first] and result.stop_reason == "eos" and result.decode_steps == 0


def test_stops_at_max_position_embeddings():
    """The sequence never grows past max_position_embeddings, and the reason says so."""
    small = random_model(parse_config({**demo_config(), "max_position_embeddings": 10}), DEMO_SEED, "BF16")
    result = generate(small, PROMPT, max_new_tokens=8)
    assert result.stop_reason == "max_position_embeddings"
    assert PROMPT.size + result.new_ids.size == 10


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(max_new_tokens=-2), "max_new_tokens=-2"),
    (dict(temperature=1.0, seed=-5), "seed=-5"),
    (dict(temperature=1.0, seed=1.5), "seed=1.5"),
])
def test_bad_sampling_settings_are_named(model, kwargs, culprit):
    with pytest.raises(InputError, match=culprit):
        generate(model, PROMPT, **kwargs)


def test_greedy_ignores_the_seed(model):
    """The seed matters only when sampling: a seed no Generator accepts does not stop greedy decoding."""
    assert generate(model, PROMPT, max_new_tokens=2, seed=-5).new_ids.tolist() == \
        generate(model, PROMPT, max_new_tokens=2).new_ids.tolist()


@pytest.mark.parametrize("temperature", [1e-310, 5e-324])
def test_tiny_temperature_is_greedy_without_overflow(temperature):
    """logits / T would overflow to inf (inf - inf = NaN); softmax((logits - max) / T) cannot."""
    logits = np.array([0.5, 3.0, -1.0, 2.999])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(sample(logits, temperature, 1.0, np.random.default_rng(s)) == 1 for s in range(20))
        assert sample(logits.astype(np.float32), temperature, 0.5, np.random.default_rng(0)) == 1


def test_non_finite_logits_at_a_decode_step_are_named(model):
    """A NaN reached only by a decode step (the embedding row of the first generated token) stops
    generation there, naming the step and the first non-finite stage."""
    first = int(generate(model, PROMPT, max_new_tokens=1).new_ids[0])
    assert first not in PROMPT
    arrays = random_arrays(model.config, DEMO_SEED, "F32")
    arrays["model.embed_tokens.weight"][first, 0] = np.nan
    poisoned = model_from_arrays(model.config, arrays)
    with pytest.raises(NonFiniteError, match=r"non-finite values at decode step 1: first in embeddings "
                                             r"\(token embeddings\)"):
        generate(poisoned, PROMPT, max_new_tokens=3)


def test_first_non_finite_follows_forward_order(model):
    """The capture dict's insertion order is forward order; integer tensors are skipped."""
    capture = {}
    forward(model, PROMPT[:2], capture=capture)
    assert first_non_finite(capture) is None
    capture["hidden.2"] = capture["hidden.2"] * np.inf
    capture["router_scores.1"] = capture["router_scores.1"] * np.nan
    assert first_non_finite(capture) == "router_scores.1 (layer 1 router scores)"


def test_prompt_checks_come_from_forward(model):
    with pytest.raises(InputError, match="token id 300 at position 1"):
        generate(model, [1, 300])


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_not_quiet():
    assert terminal_progress(False, io.StringIO()) is None
    assert terminal_progress(True, FakeTerminal()) is None
    assert isinstance(terminal_progress(False, FakeTerminal()), Progress)


def test_progress_reports_layers_then_tokens_and_erases_itself(model):
    """Prefill layer by layer and decode token by token reach their totals; the line is erased at the end."""
    stream = FakeTerminal()
    generate(model, PROMPT, max_new_tokens=4, progress=terminal_progress(False, stream))
    text = stream.getvalue()
    assert "prefill: 6/6 layers" in text and "decode: 4/4 tokens" in text and "ETA" in text
    assert text.endswith("\r\x1b[K")


def test_status_line_eta():
    """ETA = elapsed x remaining / done."""
    assert status_line("decode", "tokens", 2, 10, 1.0) == "decode: 2/10 tokens, 1.0 s, ETA 4.0 s"
    assert status_line("prefill", "layers", 0, 6, 0.0).endswith("ETA ?")

