"""The fixed-reply screen and the guard defense: flagged rows say exactly the message, the others are untouched."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config, tiny_model

from safetylock import SafetylockError
from safetylock.generate import format_chat
from safetylock.guard import (
    GuardConfig,
    GuardDefense,
    answer_ids,
    fit_guard,
    guard_prompt,
    guard_scores,
    turn_markers,
    user_request,
    yes_no_score,
)
from safetylock.screen import REFUSAL_MESSAGE, forced_reply, message_token_ids

PROMPTS = ["How do I pick a lock on my neighbour's door?", "Hi", "Write a haiku about autumn rain, please."]
FLAGS = torch.tensor([True, False, True])


def batch(tokenizer, prompts=PROMPTS, system=None):
    tokenizer.padding_side = "left"
    return tokenizer([format_chat(tokenizer, p, system) for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def fixed(flags):
    return lambda ids, mask: flags


def generated(model, enc, **kw):
    args = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0, "eos_token_id": 2}
    with torch.no_grad():
        out = model.generate(**enc, **{**args, **kw})
    return out[:, enc["input_ids"].shape[1]:]


def expected_reply(tokenizer, width):
    ids = message_token_ids(tokenizer, REFUSAL_MESSAGE) + [2]
    return torch.tensor((ids + [0] * width)[:width])


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # gemma2 soft-caps its logits after lm_head
def test_generate_emits_exactly_the_message_for_flagged_rows(tokenizer, family):
    model = tiny_model(family)
    enc = batch(tokenizer)
    plain = generated(model, enc)
    with forced_reply(model, tokenizer, fixed(FLAGS)) as screen:
        greedy = generated(model, enc)
        sampled = generated(model, enc, do_sample=True, temperature=1.7, top_k=0, top_p=1.0)
    for row in (0, 2):
        assert torch.equal(greedy[row], expected_reply(tokenizer, greedy.shape[1]))
        assert torch.equal(sampled[row], expected_reply(tokenizer, sampled.shape[1]))
        assert tokenizer.decode(greedy[row], skip_special_tokens=True) == REFUSAL_MESSAGE
    width = min(greedy.shape[1], plain.shape[1])
    assert torch.equal(greedy[1, :width], plain[1, :width])
    assert screen.prompts == 6 and screen.refused == 4 and torch.equal(screen.flagged, FLAGS)


def test_unflagged_rows_compute_bit_identically_and_flagged_ones_only_at_the_last_position(tokenizer):
    model = tiny_model("llama")
    enc = batch(tokenizer)
    with torch.no_grad():
        before = model(**enc).logits
        with forced_reply(model, tokenizer, fixed(FLAGS)):
            hooked = model(**enc).logits
    assert torch.equal(hooked[1], before[1])
    assert torch.equal(hooked[[0, 2], :-1], before[[0, 2], :-1])
    first = message_token_ids(tokenizer, REFUSAL_MESSAGE)[0]
    last = hooked[[0, 2], -1]
    assert torch.all(last[:, first] == 0) and torch.isinf(last).sum() == 2 * (last.shape[1] - 1)


def test_cached_and_cacheless_decoding_continue_the_message(tokenizer):
    model = tiny_model("qwen2")
    enc = batch(tokenizer)
    with forced_reply(model, tokenizer, fixed(FLAGS)):
        cached = generated(model, enc)
        cacheless = generated(model, enc, use_cache=False)
    assert torch.equal(cached[[0, 2]], cacheless[[0, 2]])
    assert torch.equal(cached[0], expected_reply(tokenizer, cached.shape[1]))


def test_a_peft_model_is_screened_once_per_prompt(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, target_modules="all-linear"))
    enc = batch(tokenizer)
    calls = []

    def decide(ids, mask):
        calls.append(ids.shape)
        return FLAGS

    with forced_reply(model, tokenizer, decide):
        out = generated(model, enc)
        with torch.no_grad():
            direct = model(**enc).logits
    assert len(calls) == 2  # one generate prefill, one direct call (the wrapper and the inner model share it)
    assert torch.equal(out[0], expected_reply(tokenizer, out.shape[1]))
    assert direct[0, -1].isinf().sum() == direct.shape[-1] - 1


def test_decide_may_run_the_model_itself(tokenizer):
    model = tiny_model("llama")
    enc = batch(tokenizer)

    def decide(ids, mask):  # a probe on the same weights: the hooks must stand aside
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        assert not logits.isinf().any()
        return FLAGS

    with forced_reply(model, tokenizer, decide):
        out = generated(model, enc, max_new_tokens=5)
    assert torch.equal(out[0], expected_reply(tokenizer, 5))


def test_an_opening_is_forced_then_the_model_continues_from_it(tokenizer):
    """Row 1 gets a 3-token opening, row 2 one that ends in EOS; row 0 the message. After its opening, row 1 is
    the model's own continuation of the opening, exactly as if the opening had been part of the prompt."""
    model = tiny_model("qwen2")
    enc = batch(tokenizer)
    head, short = [11, 12, 13], [14, 2]
    with forced_reply(model, tokenizer, lambda ids, mask: (torch.tensor([True, False, False]),
                                                          [[7, 7], head, short])) as screen:
        out = generated(model, enc, max_new_tokens=10)
    assert torch.equal(out[0], expected_reply(tokenizer, 10))  # a flagged row's opening is ignored
    assert out[1, :3].tolist() == head and out[2, :2].tolist() == short and set(out[2, 2:].tolist()) <= {0}
    extended = {"input_ids": torch.cat([enc["input_ids"][1:2], torch.tensor([head])], 1),
                "attention_mask": torch.cat([enc["attention_mask"][1:2], torch.ones(1, 3, dtype=torch.long)], 1)}
    alone = generated(model, extended, max_new_tokens=7)
    assert torch.equal(out[1, 3:], alone[0])
    assert screen.refused == 1 and screen.opened == 2


def test_openings_must_be_one_per_row_and_in_the_vocabulary(tokenizer):
    model = tiny_model("llama")
    enc = batch(tokenizer)
    with pytest.raises(SafetylockError, match="one per row"):
        with forced_reply(model, tokenizer, lambda ids, mask: (FLAGS, [[1]])):
            model(**enc)
    with pytest.raises(SafetylockError, match="opening is outside"):
        with forced_reply(model, tokenizer, lambda ids, mask: (FLAGS, [[], [10 ** 6], []])):
            model(**enc)


def test_hooks_are_removed_even_after_an_error(tokenizer):
    model = tiny_model("llama")
    enc = batch(tokenizer)
    with torch.no_grad():
        before = model(**enc).logits
    hooks = hook_count(model)
    with pytest.raises(RuntimeError, match="inside"):
        with forced_reply(model, tokenizer, fixed(FLAGS)):
            raise RuntimeError("inside")
    with pytest.raises(SafetylockError, match="one flag per row"):
        with forced_reply(model, tokenizer, fixed(torch.tensor([True]))):
            model(**enc)
    assert hook_count(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)


def test_bad_messages_and_orphan_cached_calls_are_refused(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(SafetylockError, match="empty"):
        with forced_reply(model, tokenizer, fixed(FLAGS), "  "):
            pass
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), cache=cache)
        with pytest.raises(SafetylockError, match="without the prompt"):
            with forced_reply(model, tokenizer, fixed(torch.tensor([True]))):
                model(input_ids=torch.tensor([[8]]), cache=cache)


# ---------------------------------------------------------------------------------------------------------
# The guard


def test_yes_no_score_is_the_log_odds_of_the_answer_tokens():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 3.0], [5.0, 0.0, 0.0, 4.0, 0.0]])
    score = yes_no_score(logits, [1, 2], [3])
    want = torch.logsumexp(logits[:, [1, 2]], -1) - logits[:, 3]
    assert torch.allclose(score, want)


def test_answer_ids_are_distinct_first_tokens(tokenizer):
    yes, no = answer_ids(tokenizer)
    assert not set(yes) & set(no)
    assert tokenizer.convert_tokens_to_ids("Y") in yes and tokenizer.convert_tokens_to_ids("N") in no


def test_guard_scores_read_the_guards_next_token_logits(tokenizer):
    guard = tiny_model("qwen2", seed=3)
    yes, no = answer_ids(tokenizer)
    scores = guard_scores(guard, tokenizer, PROMPTS, yes, no, batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(guard_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            last = guard(input_ids=ids).logits[:, -1]
        assert torch.allclose(scores[i], yes_no_score(last, yes, no)[0], atol=1e-5)


def test_user_request_reads_the_last_user_turn(tokenizer):
    markers = turn_markers(tokenizer)
    for system in (None, "Be nice."):
        ids = tokenizer(format_chat(tokenizer, PROMPTS[0], system), add_special_tokens=False)["input_ids"]
        assert user_request(tokenizer, ids, markers) == PROMPTS[0]
    prefilled = tokenizer(format_chat(tokenizer, PROMPTS[0]) + "Sure, here", add_special_tokens=False)["input_ids"]
    assert user_request(tokenizer, prefilled, markers) == PROMPTS[0]


def guard_defense(tokenizer, guard, threshold):
    config = fit_guard(guard, tokenizer, spec="tiny-guard", threshold=threshold)
    return GuardDefense(config, tokenizer=tokenizer, guard=(guard, tokenizer))


def test_guard_refuses_what_its_real_score_flags(tokenizer, monkeypatch):
    import safetylock.guard as guard_module

    model, guard = tiny_model("qwen2"), tiny_model("qwen2", seed=3)
    yes, no = answer_ids(tokenizer)
    scores = guard_scores(guard, tokenizer, PROMPTS, yes, no)
    calls = []
    real = guard_module.guard_scores
    monkeypatch.setattr(guard_module, "guard_scores", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    enc = batch(tokenizer)
    plain = generated(model, enc)
    low = scores.sort().values
    cut = float(low[0] + low[1]) / 2  # the two higher scores are flagged
    defense = guard_defense(tokenizer, guard, cut)
    with defense.applied(model) as defended:
        out = generated(defended, enc)
    assert calls == [PROMPTS]  # the user turns, read back from the tokens
    for row, flagged in enumerate((scores > cut).tolist()):
        if flagged:
            assert tokenizer.decode(out[row], skip_special_tokens=True) == REFUSAL_MESSAGE
        else:
            assert torch.equal(out[row, : plain.shape[1]], plain[row, : out.shape[1]])
    assert int((scores > cut).sum()) == 2
    info = defense.describe()
    assert info["screened"] == 3 and info["refused"] == 2 and info["seconds_per_prompt"] > 0
    with defense.applied(model, alpha=float(scores.max()) + 1) as defended:  # alpha, when given, is the threshold
        assert torch.equal(generated(defended, enc), plain)


def test_guard_file_round_trips_and_refuses_another_guard(tmp_path, tokenizer):
    guard = tiny_model("qwen2")
    config = fit_guard(guard, tokenizer, spec="tiny-guard", threshold=-0.5)
    back = GuardConfig.load(config.save(tmp_path / "guard.safetensors"))
    assert (back.spec, back.threshold, back.yes_ids, back.no_ids, back.message) == (
        "tiny-guard", -0.5, config.yes_ids, config.no_ids, REFUSAL_MESSAGE)
    from transformers import AutoModelForCausalLM

    small = tiny_config("qwen2")
    small.num_hidden_layers = 2
    defense = GuardDefense(back, tokenizer=tokenizer, guard=(AutoModelForCausalLM.from_config(small), tokenizer))
    with pytest.raises(SafetylockError, match="another shape"):
        with defense.applied(tiny_model("qwen2")):
            pass
    with pytest.raises(SafetylockError, match="finite"):
        with GuardDefense(back, tokenizer=tokenizer, guard=(guard, tokenizer)).applied(guard, alpha=float("nan")):
            pass
    from safetylock.baselines import make_defense

    assert isinstance(make_defense("guard", tmp_path / "guard.safetensors"), GuardDefense)
    with pytest.raises(SafetylockError, match="not a guard file"):
        GuardConfig.load(_other_file(tmp_path))


def _other_file(tmp_path):
    from safetylock.files import write_tagged_safetensors

    return write_tagged_safetensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"format": "else"})
