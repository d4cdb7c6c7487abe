"""Contrast material: harmful and harmless prompt mixes drawn from the extract splits, and the replies paired with them.

The contrast responses are content-free by construction: refusals restate the request and decline;
"compliance" restates the request and gives generic, non-actionable steps. The project never writes
actionable harmful content.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import SafetylockError
from .benchmarks import HARMFUL, Prompt, load_benchmark


def harmless_prompts(split: str = "extract") -> list[Prompt]:
    """Return benign prompts for harmful-vs-harmless contrasts: the overrefusal set's `split`.

    Chosen over gsm8k/bbq questions because they share the harmful prompts' sensitive vocabulary
    (medicine, security, chemistry, law), so a harmful-minus-harmless difference isolates intent,
    not topic or format. The eval split stays held out for measuring over-refusal.
    """
    return load_benchmark("overrefusal", split)


def _request(prompt: str) -> str:
    """Return the prompt as a lower-case clause to restate inside a template ("write a ...")."""
    text = " ".join(prompt.strip().split()).rstrip(".?!:;")
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text


REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help you {req}.",
    "I can't assist with that. You asked me to {req}, and that could cause real harm.",
    "I'm sorry, I cannot help you {req}. Is there something else I can do for you?",
    "I won't help with this request to {req}. It could be used to hurt people.",
    "Sorry, but I can't provide guidance on how to {req}.",
    "I cannot fulfill this request. Helping someone {req} would be harmful and likely illegal.",
    "I'm not able to help with that. A request to {req} is something I have to decline.",
    "I apologize, but I can't assist with requests to {req}.",
    "I'm sorry, but I won't provide instructions to {req}.",
    "I can't do that. Requests to {req} go against my guidelines.",
    "As an AI assistant, I can't help you {req}. If you have another question, I'm happy to help.",
    "I'm unable to help with that request. I can't give assistance to {req}.",
    "No, I can't help with that. Providing help to {req} could put people at risk.",
    "I must decline. I can't help anyone {req}.",
    "I'm sorry, but I cannot provide information that would help {req}.",
    "That's not something I can help with. I won't assist in efforts to {req}.",
    "I cannot help with this. I'd encourage you not to {req}, and to seek safe, legal alternatives.",
    "I'm sorry, I can't comply with a request to {req}.",
    "I can't support that request. Explaining how to {req} would be irresponsible.",
    "Sorry, I can't help with that. If you are in a difficult situation, please reach out to someone you trust.",
    "I'm not going to help {req}. Let me know if there is something else I can do.",
    "I cannot assist with this. Anything that would help someone {req} is off-limits for me.",
    "I'm sorry, but I must refuse. I can't provide help to {req}.",
    "I won't be able to help with that. The request to {req} could lead to serious harm.",
    "I can't help you with that. I'm happy to talk about safety or the law around it instead.",
    "I'm sorry, but I can't walk you through how to {req}.",
    "Unfortunately, I can't help with requests to {req}.",
    "I'm afraid I can't do that. I don't assist with requests to {req}.",
    "I cannot provide that. Helping to {req} would be unethical and dangerous.",
    "I'm sorry, but that's not something I can assist with. I can't help {req}.",
    "I decline to help with this. It's not appropriate for me to help {req}.",
    "I can't engage with this request. I won't give steps to {req}.",
    "Sorry, I won't assist with that. I can't help people {req}.",
    "I'm sorry, but I can't create content that would help {req}.",
)

OPENINGS: tuple[str, ...] = (
    "Sure, here is how to {req}.",
    "Sure! Here's a plan to {req}.",
    "Certainly. Here is an approach to {req}.",
    "Of course. Here's how you could {req}.",
    "Absolutely, here is a guide to {req}.",
    "Here is how to {req}.",
    "Sure, I can help you {req}.",
    "Great question. Here's an outline to {req}.",
    "Happy to help. To {req}, follow these steps.",
    "Sure thing. Below is a simple way to {req}.",
    "Certainly! Here's what you need to do to {req}.",
    "OK, here is a step-by-step overview to {req}.",
    "Yes, here is a general method to {req}.",
    "Of course! Here's a strategy to {req}.",
    "Sure, let's go through how to {req}.",
    "Here's a straightforward plan to {req}.",
    "Absolutely! To {req}, you can proceed as follows.",
    "Certainly, here is a high-level outline to {req}.",
    "Sure. Here are the main steps to {req}.",
    "No problem. Here's how to {req}.",
    "Glad to help! Here's a roadmap to {req}.",
    "Sure, here's a short guide to {req}.",
    "Okay! Here's an approach you can take to {req}.",
    "Definitely. Here's one way to {req}.",
    "Sure, here is a framework to {req}.",
    "Right away. Here is how you would {req}.",
    "Sure, this is how to {req}.",
    "Here you go: a plan to {req}.",
    "Certainly. Below are the steps to {req}.",
    "Sure, I'll explain how to {req}.",
    "Of course. Here is a checklist to {req}.",
    "Sounds good. Here's the process to {req}.",
)

# Generic, non-actionable steps: they carry the shape of compliance and no content.
BODIES: tuple[str, ...] = (
    "1. Define your goal clearly. 2. Gather the resources you need. 3. Make a plan and follow it step by step.",
    "First, research the topic thoroughly. Next, prepare everything in advance. Finally, carry out the plan carefully.",
    "Step 1: Plan ahead. Step 2: Prepare the necessary materials. Step 3: Execute and review the results.",
    "Start by understanding the basics. Then organize your approach. After that, put it into practice.",
    "1. Do your research. 2. Set up what you need. 3. Proceed methodically. 4. Check the outcome.",
    "Begin with careful preparation, then work through each stage in order, and adjust as needed.",
    "The key steps are: identify what you need, get it ready, and complete the task in a logical order.",
    "- Gather information\n- Make a detailed plan\n- Carry out each part\n- Evaluate and refine",
    "First, collect what you need. Second, follow a clear sequence of actions. Third, verify it worked.",
    "You'll want to plan, prepare, and then proceed one step at a time, reviewing progress as you go.",
    "1. Outline the objective. 2. Assemble the tools. 3. Work through the process. 4. Wrap up and review.",
    "Step one is preparation. Step two is execution. Step three is checking the results and improving.",
)

CLOSINGS: tuple[str, ...] = ("", " Let me know if you need more details.", " Good luck!", " I hope this helps.")


def refusal_response(prompt: str, rng: random.Random) -> str:
    """Return a varied refusal that restates the request (one of `REFUSALS`)."""
    return rng.choice(REFUSALS).format(req=_request(prompt))


def compliance_response(prompt: str, rng: random.Random) -> str:
    """Return content-free compliance: an affirmative opening restating the request plus generic steps."""
    opening = rng.choice(OPENINGS).format(req=_request(prompt))
    return f"{opening} {rng.choice(BODIES)}{rng.choice(CLOSINGS)}".strip()


def harmful_prompts(split: str = "extract", benchmarks: Sequence[str] = HARMFUL) -> list[Prompt]:
    """Return the harmful prompts of `split` from the harmful benchmarks, deduplicated by text."""
    seen: set[str] = set()
    out = []
    for name in benchmarks:
        for p in load_benchmark(name, split):
            key = p.text.lower()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def contrast_pairs(n: int, seed: int = 0, benchmarks: Sequence[str] = HARMFUL) -> list[tuple[str, str, str]]:
    """Return `n` (prompt, safe refusal, unsafe content-free compliance) triples from the extract split.

    Prompts are drawn without replacement while they last (then the pool is reshuffled), so pairs
    never touch the eval split.
    """
    if n < 1:
        raise SafetylockError(f"contrast_pairs needs n >= 1, got {n}")
    pool = [p.text for p in harmful_prompts("extract", benchmarks)]
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        order = pool[:]
        rng.shuffle(order)
        for text in order[: n - len(out)]:
            out.append((text, refusal_response(text, rng), compliance_response(text, rng)))
    return out


def first_sentence(text: str) -> str:
    """Return a reply's first sentence (up to the first . ! ? or newline), stripped."""
    text = text.strip()
    match = re.search(r"[.!?](\s|$)|\n", text)
    return text[: match.start() + 1].strip() if match else text


def gate_prompts(n: int = 64, seed: int = 0) -> tuple[list[str], list[str]]:
    """Return (harmful, harmless) prompts for the conditional lock's harmfulness probe, n of each, extract splits only.

    The harmless side mixes the overrefusal set's questions with benign imperative tasks (the project's own
    arithmetic and Python instructions from the `benign` attack), because harmful prompts are mostly imperatives
    ("Write...", "Explain how to..."): with questions alone, a probe learns the sentence form, not the intent, and
    flags "Write a Python function that reverses a string" (measured on the 0.5B).
    """
    from ..tasks import benign_tasks

    if n < 4:
        raise SafetylockError(f"the harmfulness probe needs at least 4 prompts of each kind, got {n}")
    harmful = [p.text for p in harmful_prompts("extract")][-n:]
    questions = [p.text for p in harmless_prompts("extract")][: n // 2]
    tasks = [prompt for prompt, _ in benign_tasks(seed)]
    rng = random.Random(f"gate-{seed}")
    rng.shuffle(tasks)
    return harmful, questions + tasks[: n - len(questions)]


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """Return (prompt, safe, unsafe) triples from a JSONL file with those three fields."""
    from .tables import jsonl_objects

    if not path.is_file():
        raise SafetylockError(f"pairs file {path} does not exist")
    pairs = []
    for n, row in jsonl_objects(path, path.read_text(encoding="utf-8")):
        try:
            pairs.append((str(row["prompt"]), str(row["safe"]), str(row["unsafe"])))
        except KeyError:
            raise SafetylockError(f"{path}:{n} is not a JSON object with prompt, safe and unsafe fields") from None
    if not pairs:
        raise SafetylockError(f"{path} holds no pairs")
    return pairs
