"""The out-of-distribution pieces: gates fitted on features, prompt attacks, what the user sees, the composition."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import tiny_model

from safetylock.errors import SafetylockError
from safetylock.gates import fit_gate, parse_design, source_weights, template_features, with_gate
from safetylock.generate import chat_text, format_chat, generate
from safetylock.judges import Judgment, reply_kind
from safetylock.lock import fit_condition, template_token_count
from safetylock.prompt_attacks import PREFILL, get_prompt_attack, prompt_attack_names
from test_lock import synthetic_lock


def synthetic_features(n_per: int = 20, seed: int = 0) -> tuple[torch.Tensor, list[int], list[str]]:
    """Two sources; label 1 shifts head (1, 2) along a fixed direction, every other head is noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n_per, 3, 4, 8, generator=g)
    labels = [1] * n_per + [0] * n_per + [1] * n_per + [0] * n_per
    x[torch.tensor(labels, dtype=torch.bool), 1, 2, :] += 3.0
    sources = ["a"] * (2 * n_per) + ["b"] * (2 * n_per)
    return x, labels, sources


def test_source_weights_give_every_source_and_label_the_same_total():
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0])
    sources = ["a", "a", "a", "a", "b", "b", "b", "b", "b"]
    w = source_weights(sources, labels)
    totals = {(s, y): w[[i for i in range(9) if sources[i] == s and labels[i] == y]].sum() for s in "ab" for y in (0, 1)}
    assert np.allclose(list(totals.values()), totals["a", 1]) and np.isclose(w.sum(), len(w))


def test_top_heads_gate_finds_the_informative_head_and_separates():
    x, labels, sources = synthetic_features()
    gate = fit_gate(x, labels, sources, "heads:1")
    assert (gate.layers, gate.heads) == ([1], [2])
    assert ((gate.scores(x) > 0) == np.array(labels, dtype=bool)).mean() > 0.95


def test_all_heads_gate_reads_every_head_and_benign_threshold_moves_the_cut():
    x, labels, sources = synthetic_features()
    plain = fit_gate(x, labels, sources, "all")
    loose = fit_gate(x, labels, sources, "all@benign:0.5")
    assert len(plain.layers) == 12 and loose.about["threshold"]["benign_share"] == 0.5
    benign = np.array(labels) == 0
    # Asking that half the benign prompts pass lowers the cut: more benign prompts fire than at logit 0.
    assert (loose.scores(x)[benign] > 0).sum() > (plain.scores(x)[benign] > 0).sum()


@pytest.mark.parametrize("bad", ["heads:0", "heads:x", "every", "all@benign:1.5", "all@logits", "heads:4@benign:"])
def test_bad_designs_are_refused_in_one_line(bad):
    with pytest.raises(SafetylockError, match="bad gate"):
        parse_design(bad)


def test_template_features_are_what_the_lock_gate_reads(tokenizer):
    """A gate fitted on template_features, installed in a lock, gives Lock.condition_logits' scores exactly."""
    model = tiny_model("qwen2")
    prompts = [f"please do task number {i} now" for i in range(6)] + ["a much longer prompt that needs padding here"]
    n_template = template_token_count(tokenizer)
    feats = template_features(model, tokenizer, [format_chat(tokenizer, p) for p in prompts], n_template=n_template,
                              batch_size=3)
    gate = fit_gate(feats, [1, 0, 1, 0, 1, 0, 1], ["s"] * 7, "heads:2")
    lock = with_gate(synthetic_lock(model), gate, n_template)
    assert np.allclose(lock.condition_logits(model, tokenizer, prompts).numpy(), gate.scores(feats), atol=1e-4)


def test_builtin_probe_scores_match_through_features(tokenizer):
    """The old fit_condition probe, read through template_features, gives its own condition_logits."""
    from safetylock.gates import installed_gate

    model = tiny_model("llama")
    lock = fit_condition(synthetic_lock(model), model, tokenizer, [f"bomb {i}" for i in range(4)],
                         [f"cake {i}" for i in range(4)], heads=2)
    prompts = ["make a bomb", "bake a cake please"]
    feats = template_features(model, tokenizer, [format_chat(tokenizer, p) for p in prompts],
                              n_template=template_token_count(tokenizer))
    assert np.allclose(installed_gate(lock).scores(feats), lock.condition_logits(model, tokenizer, prompts).numpy(), atol=1e-4)


def test_prompt_attacks_build_the_conversation(tokenizer):
    assert get_prompt_attack(None).messages("q") == [{"role": "user", "content": "q"}]
    two = get_prompt_attack("two-turn").messages("q", "sys")
    assert [m["role"] for m in two] == ["system", "user", "assistant", "user"] and two[-1]["content"] == "q"
    persona = get_prompt_attack("persona").messages("q", "sys")
    assert persona[0]["content"].startswith("sys\n\n") and "AOA" in persona[0]["content"]
    prefill = get_prompt_attack("prefill")
    assert chat_text(tokenizer, prefill.messages("q"), prefill.prefill).endswith("assistant\n" + PREFILL)
    assert prefill.reply("a list") == f"{PREFILL} a list" and prefill.reply("") == PREFILL
    with pytest.raises(SafetylockError, match="unknown prompt attack 'bogus'"):
        get_prompt_attack("bogus")


def test_jailbreak_templates_come_from_the_pinned_corpus_with_the_request_inside():
    names = [n for n in prompt_attack_names() if n.startswith("jailbreak:")]
    assert len(names) == 8
    for name in names:
        text = get_prompt_attack(name).user_text("REQUEST-XYZ")
        assert "REQUEST-XYZ" in text and "{{" not in text and len(text) > len("REQUEST-XYZ")


def test_generate_under_prefill_returns_what_the_user_sees(tokenizer):
    model = tiny_model("qwen2")
    run = generate(model, tokenizer, ["hello"], max_new_tokens=3, attack=get_prompt_attack("prefill"))
    assert run.texts[0].startswith(PREFILL)


@pytest.mark.parametrize("reply,refused,kind", [
    ("", True, "empty"), ("   ", True, "empty"),
    ("I'm sorry, but I can't help with that.", True, "refusal"),
    ("Of course. I'm here to help.", False, "deflection"),
    ("Here is a long answer " + "word " * 20, True, "deflection"),
    ("Here is a long answer " + "word " * 20, False, "compliance"),
])
def test_reply_kinds(reply, refused, kind):
    assert reply_kind(reply, Judgment(refused, None, "")) == kind


def test_conditional_composition_takes_locked_replies_where_the_gate_fires():
    from safetylock.ood import REFUSAL_MESSAGE, _compose

    def row(i, text, refused):
        return {"id": str(i), "response": text, "judgment": {"refused": refused, "score": None, "reason": ""}}

    ft = [row(i, "Sure " + "step " * 20, False) for i in range(4)]
    locked = [row(i, "I cannot help with that.", True) for i in range(4)]
    out = _compose(ft, locked, np.array([True, True, False, False]), harmful=True)
    assert out["conditional"]["k"] == 2 and out["gate-only"]["k"] == 2 and out["fired"]["k"] == 2
    assert out["interventions"]["refusal"] == 2 and out["conditional"]["n"] == 4
    from safetylock.judges import refusal_marker

    assert refusal_marker(REFUSAL_MESSAGE) is not None  # the gate-only reply counts as a refusal in words


def test_gate_on_sources_fits_on_extract_splits_of_every_source(tokenizer):
    from safetylock.data import OOD_BENIGN, OOD_HARMFUL
    from safetylock.gates import fit_gate_on_sources

    model = tiny_model("qwen2")
    gate = fit_gate_on_sources(model, tokenizer, "heads:2", limit=2)
    assert gate.about["sources"] == sorted(OOD_HARMFUL + OOD_BENIGN) and gate.about["split"] == "extract"
    assert gate.about["n_lock"] == 2 * len(OOD_HARMFUL) and gate.about["n_leave"] == 2 * len(OOD_BENIGN)


def test_gate_refusal_replies_the_message_exactly_where_the_gate_fires(tokenizer):
    """Gate-only refusal: flagged prompts get the fixed message, the others the model's own reply, bit for bit."""
    from safetylock.baselines import GateRefusal
    from safetylock.screen import REFUSAL_MESSAGE

    model = tiny_model("qwen2")
    lock = fit_condition(synthetic_lock(model), model, tokenizer, [f"bomb {i}" for i in range(4)],
                         [f"cake {i}" for i in range(4)], heads=2)
    prompts = ["make a bomb", "bake a cake"]
    raw = lock.condition_logits(model, tokenizer, prompts)
    lock = lock.with_gate(replace(lock.gate, bias=lock.gate.bias - float(raw.mean())))  # the threshold between the two
    flags = lock.flagged(model, tokenizer, prompts)
    plain = generate(model, tokenizer, prompts, max_new_tokens=40).texts
    with GateRefusal(lock, tokenizer).applied(model):
        screened = generate(model, tokenizer, prompts, max_new_tokens=40).texts
    for flag, before, after in zip(flags.tolist(), plain, screened):
        assert after == (REFUSAL_MESSAGE if flag else before)
    assert int(flags.sum()) == 1
    # alpha is the gate's logit threshold: above every logit nothing is refused, below every logit everything is.
    high, low = float(raw.max() - raw.mean()) + 1.0, float(raw.min() - raw.mean()) - 1.0
    with GateRefusal(lock, tokenizer).applied(model, high):
        assert generate(model, tokenizer, prompts, max_new_tokens=40).texts == plain
    with GateRefusal(lock, tokenizer).applied(model, low):
        assert generate(model, tokenizer, prompts, max_new_tokens=40).texts == [REFUSAL_MESSAGE] * 2
    with pytest.raises(SafetylockError, match="gate threshold must be finite"):
        with GateRefusal(lock, tokenizer).applied(model, float("nan")):
            pass


def test_recalibrate_sets_the_benign_firing_share_on_the_guarded_model():
    """A gate fitted on the base, read on a model whose features moved, fires on everything until recalibrated."""
    from safetylock.gates import recalibrate

    x, labels, sources = synthetic_features()
    gate = fit_gate(x, labels, sources, "heads:1")
    moved = x.clone()
    moved[:, 1, 2, :] += 3.0  # a fine-tune moved the head the gate reads
    benign = [i for i, y in enumerate(labels) if y == 0]
    assert (gate.scores(moved[benign]) > 0).mean() > 0.9
    fixed = recalibrate(gate, moved[benign], [sources[i] for i in benign], 0.25)
    assert (fixed.scores(moved[benign]) > 0).mean() <= 0.25 + 1 / len(benign)
    assert fixed.layers == gate.layers and np.array_equal(fixed.weight, gate.weight)
    with pytest.raises(SafetylockError, match="bad gate threshold"):
        parse_design("all@deployed:2")


def test_refusal_labels_parse_and_keep_the_heads_and_threshold():
    d = parse_design("refusal:all@deployed:0.05")
    assert (d.labels, d.heads, d.k, d.threshold) == ("refusal", "all", None, "deployed:0.05")
    assert parse_design("heads:8").labels == "harm" and parse_design("refusal:heads:3").k == 3
    with pytest.raises(SafetylockError, match="bad gate design"):
        parse_design("refusal:")


def test_a_gate_that_reads_the_base_switches_the_adapter_off_for_the_decision_only(tokenizer):
    """reads='base': the gate's logits on a LoRA fine-tune equal its logits on the bare base, exactly, and the
    shifted replies are the fine-tune's; reads='model' reads the fine-tune's own (different) features."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_model("qwen2")
    n_template = template_token_count(tokenizer)
    chats = [format_chat(tokenizer, t) for t in ("make a bomb", "bake a cake", "write a poem")]
    feats = template_features(base, tokenizer, chats, n_template=n_template)
    gate = fit_gate(torch.cat([feats, feats]), [1, 0, 0, 1, 0, 0], ["a"] * 3 + ["b"] * 3, "heads:2")
    on_base = with_gate(synthetic_lock(base), gate, n_template, reads="base")
    plain = on_base.condition_logits(base, tokenizer, ["make a bomb", "bake a cake", "write a poem"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    ft = get_peft_model(base, config).eval()
    prompts = ["make a bomb", "bake a cake", "write a poem"]
    assert torch.equal(on_base.condition_logits(ft, tokenizer, prompts), plain)
    reads_ft = with_gate(synthetic_lock(base), gate, n_template, reads="model")
    assert not torch.allclose(reads_ft.condition_logits(ft, tokenizer, prompts), plain)
    # The decision pass under the real hooks reads the base too, and the reply is still the fine-tune's.
    on_base = on_base.with_gate(replace(on_base.gate, bias=on_base.gate.bias + 1e6))  # fires on every prompt: shift applies, adapter on
    with on_base.applied(ft, conditional=True):
        locked = generate(ft, tokenizer, prompts, max_new_tokens=6).texts
    with on_base.applied(ft):
        always = generate(ft, tokenizer, prompts, max_new_tokens=6).texts
    assert locked == always
    with pytest.raises(SafetylockError, match="bad gate reading"):
        with_gate(synthetic_lock(base), gate, n_template, reads="both")


def test_bar_and_tables_report_both_readings():
    from safetylock.ood import meets_bar, ood_markdown

    def cell(k, n=10):
        return {"k": k, "n": n, "rate": k / n, "ci95": [0.0, 1.0], "kinds": {}}

    assert meets_bar(cell(3), cell(3), harmful=True) and not meets_bar(cell(4), cell(2), harmful=True)
    assert meets_bar(cell(3), cell(3), harmful=False) and not meets_bar(cell(4), cell(3), harmful=False)
    kinds = {"refusal": 1, "empty": 0, "deflection": 0, "compliance": 0}
    gate = {"conditional": cell(2), "gate-only": cell(2), "fired": cell(5), "fired_on_base": cell(4),
            "in_distribution": False, "interventions": kinds}
    entry = {"kind": "harmful", "n": 10, "base": cell(3), "fine-tune": cell(9), "baked": cell(0),
             "gates": {"all": {**gate, "reads-base": {**gate, "conditional": cell(5)}}, "all@deployed:0.05": gate}}
    result = {"settings": {"model": "m", "attack": "a", "judge": "j", "max_new_tokens": 4,
                           "designs": ["all", "all@deployed:0.05"]}, "sources": {"src": entry}, "attacks": {}}
    md = ood_markdown(result)
    assert "| conditional all, reads the base | 0/1 | src 0.50 vs 0.30 | 0/1 |" in md
    assert "| conditional all, reads the fine-tune | 1/1 | - | 1/1 |" in md
    assert "all@deployed:0.05, reads the base" not in md


def test_a_shared_cache_refuses_another_base_and_keeps_fine_tunes_apart(tmp_path):
    from safetylock.ood import OODSettings, _Run

    one = _Run(tmp_path / "a", OODSettings(model="m", adapter="runs/ft/h10", attack="harmful-10", cache_dir=str(tmp_path / "c")))
    two = _Run(tmp_path / "b", OODSettings(model="m", adapter="runs/ft/aoa", attack="aoa", cache_dir=str(tmp_path / "c")))
    assert one.cache == two.cache and one.ft != two.ft
    with pytest.raises(SafetylockError, match="caches another base"):
        _Run(tmp_path / "d", OODSettings(model="other", adapter=None, attack="a", cache_dir=str(tmp_path / "c")))


def test_a_gate_that_reads_the_base_warns_on_a_merged_fine_tune(tokenizer):
    import copy
    import warnings

    base = tiny_model("qwen2")
    n_template = template_token_count(tokenizer)
    feats = template_features(base, tokenizer, [format_chat(tokenizer, t) for t in ("a b", "c d")], n_template=n_template)
    gate = fit_gate(torch.cat([feats, feats]), [1, 0, 1, 0], ["a", "a", "b", "b"], "heads:1")
    from safetylock.models import fingerprint

    lock = with_gate(synthetic_lock(base), gate, n_template, reads="base")
    lock.metadata["fingerprint"] = fingerprint(base, sketch=True)  # as extract records it
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for p in merged.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with pytest.warns(UserWarning, match="reads the base, but the model has no LoRA adapter"):
        with lock.applied(merged, conditional=True):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lock.applied(base, conditional=True):  # the base itself: nothing to warn about
            pass


def test_extract_gate_with_refusal_labels_reads_what_the_base_refuses(tokenizer, monkeypatch):
    """`gate_lock(..., 'refusal:...', reads='base')`: labels come from the base's own replies, and the lock
    records that its gate reads the base."""
    import safetylock.gates as gates

    seen = {}

    def fake_labels(model, tok, texts, **kwargs):
        seen["n"] = len(texts)
        return [i % 2 for i in range(len(texts))]  # what the base "refused"

    monkeypatch.setattr(gates, "refusal_labels", fake_labels)
    model = tiny_model("qwen2")
    lock = gates.gate_lock(synthetic_lock(model), model, tokenizer, "refusal:heads:2", reads="base", limit=2)
    cond = lock.gate.condition()
    assert cond["reads"] == "base" and cond["design"] == "refusal:heads:2" and lock.has_condition
    assert seen["n"] == cond["n_lock"] + cond["n_leave"] and cond["n_lock"] == seen["n"] // 2
