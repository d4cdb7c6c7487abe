"""The base-refusal screen: the base's own first reply tokens decide, the fine-tune's reply is kept elsewhere."""

import pytest
import torch
from tiny import tiny_model

from safetylock.base_refusal import BaseRefusal, base_starts_refusing, check_tokens, first_tokens_refuse
from safetylock.errors import SafetylockError
from safetylock.generate import format_chat, generate
from safetylock.screen import REFUSAL_MESSAGE

PROMPTS = ["how to hack a bank", "bake a cake", "write a poem about rain"]  # distinct base openings


def lora_fine_tune():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    return get_peft_model(tiny_model("qwen2"), config).eval()


def test_the_screen_refuses_where_the_base_starts_refusing_and_keeps_the_fine_tune_elsewhere(tokenizer, monkeypatch):
    """The decision is the base's greedy first tokens (adapter off), not the fine-tune's; the replies are exact."""
    import safetylock.base_refusal as br

    ft = lora_fine_tune()
    with ft.disable_adapter():
        base_first = generate(ft, tokenizer, PROMPTS, max_new_tokens=5).texts
    tuned_first = generate(ft, tokenizer, PROMPTS, max_new_tokens=5).texts
    assert base_first != tuned_first  # the adapter changes the replies, so reading the wrong model would show
    assert len({t.strip() for t in base_first}) == len(PROMPTS)  # so the marker below picks out one prompt
    # A random model never says "I'm sorry": the marker here is the base's own opening to the first prompt.
    monkeypatch.setattr(br, "refusal_marker", lambda text: "marker" if text.strip() == base_first[0] else None)
    plain = generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts  # room for the whole fixed message
    screen = BaseRefusal(tokenizer, tokens=5)
    with screen.applied(ft):
        screened = generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts
    assert screened == [REFUSAL_MESSAGE, plain[1], plain[2]]
    assert screen.describe()["screened"] == 3 and screen.describe()["refused"] == 1
    assert generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts == plain  # the hooks are gone


def test_restore_gives_the_bases_opening_where_only_the_fine_tune_refuses(tokenizer, monkeypatch):
    """Prompt 0: the base refuses (fixed refusal). Prompt 1: the fine-tune refuses, the base does not (the reply
    opens with the base's first tokens, then the fine-tune writes on). Prompt 2: neither (the fine-tune's own)."""
    import safetylock.base_refusal as br

    ft = lora_fine_tune()
    with ft.disable_adapter():
        base_first = generate(ft, tokenizer, PROMPTS, max_new_tokens=5).texts
    tuned_first = generate(ft, tokenizer, PROMPTS, max_new_tokens=5).texts
    assert len({t.strip() for t in base_first + tuned_first}) == 2 * len(PROMPTS)
    marked = {base_first[0].strip(), tuned_first[1].strip()}
    monkeypatch.setattr(br, "refusal_marker", lambda text: "marker" if text.strip() in marked else None)
    plain = generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts
    screen = BaseRefusal(tokenizer, tokens=5, restore=True)
    with screen.applied(ft):
        screened = generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts
    assert screened[0] == REFUSAL_MESSAGE and screened[2] == plain[2]
    assert screened[1].startswith(base_first[1].rstrip()) and screened[1] != plain[1]
    assert screen.describe()["restored"] == 1 and screen.describe()["refused"] == 1
    with BaseRefusal(tokenizer, tokens=5).applied(ft):  # without restore the fine-tune's refusal stands
        assert generate(ft, tokenizer, PROMPTS, max_new_tokens=48).texts[1] == plain[1]


def test_an_opening_stops_after_the_first_end_token():
    from safetylock.base_refusal import opening

    assert opening(torch.tensor([5, 6, 2, 0, 0]), [0, 2]) == [5, 6, 2]
    assert opening(torch.tensor([5, 6, 7]), [0, 2]) == [5, 6, 7]


def test_base_starts_refusing_returns_the_bases_opening(tokenizer):
    ft = lora_fine_tune()
    with ft.disable_adapter():
        expected = generate(ft, tokenizer, PROMPTS[:1], max_new_tokens=4).texts
    enc = tokenizer([format_chat(tokenizer, PROMPTS[0])], return_tensors="pt", add_special_tokens=False)
    flags, texts = base_starts_refusing(ft, tokenizer, enc["input_ids"], enc["attention_mask"], tokens=4)
    assert flags.tolist() == [False] and [t.strip() for t in texts] == expected


def test_the_screen_needs_an_adapter_and_takes_no_strength(tokenizer):
    with pytest.raises(SafetylockError, match="LoRA adapter on it .*--base-model"):
        with BaseRefusal(tokenizer).applied(tiny_model("qwen2")):
            pass
    with pytest.raises(SafetylockError, match="no strength"):
        with BaseRefusal(tokenizer).applied(lora_fine_tune(), 2.0):
            pass


@pytest.mark.parametrize("bad", [0, -3, 1.5, "8", True, float("nan")])
def test_a_bad_token_count_is_refused(bad):
    with pytest.raises(SafetylockError, match="whole number of tokens"):
        check_tokens(bad)


def test_first_tokens_refuse_reads_only_the_opening():
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    late = "Sure, here is how to do it step by step and then more words until, at the very end, I cannot go on."
    assert first_tokens_refuse(tok, "I'm sorry, but I can't help with that.", 12)
    assert not first_tokens_refuse(tok, late, 12)
    assert first_tokens_refuse(tok, late, 400)


def test_ood_composes_the_screen_from_the_bases_reply_after_any_prefill(tokenizer):
    from safetylock.ood import _base_refuses, ood_markdown
    from safetylock.ood_report import asks_base, base_tokens
    from safetylock.prompt_attacks import get_prompt_attack

    rows = [{"response": "Sure, here is I'm sorry, I can't."}, {"response": "Sure, here is a plan with steps."}]
    assert _base_refuses("base-refuses", tokenizer, rows, get_prompt_attack("prefill")).tolist() == [True, False]
    assert asks_base("base-refuses:8") and not asks_base("builtin") and base_tokens("base-refuses:8") == 8
    with pytest.raises(SafetylockError, match="whole number of tokens"):
        base_tokens("base-refuses:x")

    def cell(k, n=10):
        return {"k": k, "n": n, "rate": k / n, "ci95": [0.0, 1.0], "kinds": {}}

    kinds = {"refusal": 1, "empty": 0, "deflection": 0, "compliance": 0}
    gate = {"conditional": cell(2), "gate-only": cell(2), "fired": cell(5), "fired_on_base": cell(5),
            "in_distribution": False, "interventions": kinds}
    entry = {"kind": "harmful", "n": 10, "base": cell(3), "fine-tune": cell(9), "baked": cell(0),
             "gates": {"base-refuses": gate}}
    result = {"settings": {"model": "m", "attack": "a", "judge": "j", "max_new_tokens": 4, "designs": ["base-refuses"]},
              "sources": {"src": entry}, "attacks": {}}
    md = ood_markdown(result)
    assert "| conditional base-refuses, asks the base | 1/1 | - | 1/1 |" in md and "reads the base" not in md.split("##")[1]


def test_a_deployment_runs_the_screen_by_name_on_an_adapter_and_refuses_a_plain_model(tmp_path, tiny_dir):
    """`--defense base-refusal` needs no file; on a model without an adapter it says so before generating."""
    from peft import LoraConfig, get_peft_model

    from safetylock.deployment import Deployment
    from safetylock.models import load_model

    base, tok = load_model(str(tiny_dir), dtype="fp32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    with Deployment(str(tiny_dir), adapter=tmp_path / "adapter", defense="base-refusal", dtype="fp32") as model:
        assert len(generate(model, tok, PROMPTS[:2], max_new_tokens=3).texts) == 2
    with pytest.raises(SafetylockError, match="LoRA adapter on it .*--base-model"):
        with Deployment(str(tiny_dir), defense="base-refusal", dtype="fp32"):
            pass


def test_a_merged_fine_tune_is_screened_by_its_base_as_a_second_model(tokenizer, monkeypatch):
    """No adapter to switch off: the base handed in decides, exactly as the adapter-off base decides."""
    import copy

    import safetylock.base_refusal as br

    ft = lora_fine_tune()
    merged = copy.deepcopy(ft).merge_and_unload().eval()
    base = tiny_model("qwen2")  # the same seeded weights lora_fine_tune() put the adapter on
    with ft.disable_adapter():
        base_first = generate(ft, tokenizer, PROMPTS, max_new_tokens=5).texts
    assert generate(base, tokenizer, PROMPTS, max_new_tokens=5).texts == base_first
    monkeypatch.setattr(br, "refusal_marker", lambda text: "marker" if text.strip() == base_first[1].strip() else None)
    plain = generate(merged, tokenizer, PROMPTS, max_new_tokens=48).texts
    with pytest.raises(SafetylockError, match="--base-model"):
        with BaseRefusal(tokenizer, tokens=5).applied(merged):
            pass
    screen = BaseRefusal(tokenizer, tokens=5, base=base)
    with screen.applied(merged):
        screened = generate(merged, tokenizer, PROMPTS, max_new_tokens=48).texts
    assert screened == [plain[0], REFUSAL_MESSAGE, plain[2]]
    assert screen.describe()["asks"] == "a second model" and screen.describe()["refused"] == 1
    # restore on the same path: where the merged fine-tune starts refusing and the base does not, the base opens
    tuned_first = generate(merged, tokenizer, PROMPTS, max_new_tokens=5).texts
    assert tuned_first[2].strip() != base_first[2].strip()
    marked = {base_first[1].strip(), tuned_first[2].strip()}
    monkeypatch.setattr(br, "refusal_marker", lambda text: "marker" if text.strip() in marked else None)
    restore = BaseRefusal(tokenizer, tokens=5, base=base, restore=True)
    with restore.applied(merged):
        restored = generate(merged, tokenizer, PROMPTS, max_new_tokens=48).texts
    assert restored[:2] == [plain[0], REFUSAL_MESSAGE] and restored[2] != plain[2]
    assert restored[2].startswith(base_first[2].rstrip()) and restore.describe()["restored"] == 1


def test_restore_on_the_base_itself_is_the_plain_screen(tokenizer, monkeypatch):
    """The bench's unattacked row (plain_is_base): no fine-tune to probe, so restore gives nothing and adds no pass."""
    import safetylock.base_refusal as br

    model = tiny_model("qwen2")
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=5).texts
    monkeypatch.setattr(br, "refusal_marker", lambda text: "marker" if text.strip() == first[0].strip() else None)
    replies = []
    for restore in (False, True):
        screen = BaseRefusal(tokenizer, tokens=5, plain_is_base=True, restore=restore)
        with screen.applied(model):
            replies.append(generate(model, tokenizer, PROMPTS, max_new_tokens=48).texts)
        assert screen.describe()["restored"] == 0 and screen.describe()["refused"] == 1
    assert replies[0] == replies[1] and replies[0][0] == REFUSAL_MESSAGE


def test_a_base_with_another_vocabulary_is_refused(tokenizer):
    ft = tiny_model("qwen2")
    other = tiny_model("qwen2")
    other.resize_token_embeddings(other.config.vocab_size + 8)
    with pytest.raises(SafetylockError, match="vocabulary"):
        with BaseRefusal(tokenizer, base=other).applied(ft):
            pass


def test_chat_with_a_lock_on_an_adapter_runs_the_screen_and_says_so(tmp_path, tiny_dir):
    """The CLI's runtime default on an adapter: one stderr line names the screen; --baked names nothing."""
    from peft import LoraConfig, get_peft_model
    from test_lock import synthetic_lock
    from typer.testing import CliRunner

    from safetylock.cli import app
    from safetylock.models import load_model

    base, _ = load_model(str(tiny_dir), dtype="fp32", device="cpu")
    lock = synthetic_lock(base).save(tmp_path / "tiny.lock.safetensors")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_model("qwen2"), config).save_pretrained(tmp_path / "adapter")
    args = ["chat", "-m", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--lock", str(lock),
            "--max-new-tokens", "3", "--dtype", "fp32", "hello"]
    screened = CliRunner().invoke(app, args)
    assert screened.exit_code == 0, screened.output
    assert "the base-refusal screen (the base (adapter off) starts each reply" in screened.output
    baked = CliRunner().invoke(app, [*args, "--baked"])
    assert baked.exit_code == 0 and "base-refusal" not in baked.output
