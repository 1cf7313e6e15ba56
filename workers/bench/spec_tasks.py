"""Repetitive tasks for speculative decoding: the work where drafts from the context pay off.

Three chat prompts whose answers mostly repeat text the prompt already holds — repeat a list with
one change, answer by quoting the text, edit code — as issue 23 names them. `task_prompts(tokenizer)`
renders them with the model's chat template (plain text without one); a model with no tokenizer
(dummy weights) gets token-id prompts that repeat one random block, which exercise the same code
paths but whose acceptance says nothing about real text.
"""

from __future__ import annotations

import random

_CODE = '''def summarize(orders):
    total = 0
    count = 0
    for order in orders:
        if order.status == "paid":
            total += order.amount
            count += 1
    average = total / count if count else 0
    return {"total": total, "count": count, "average": average}
'''

_TEXT = ("The lighthouse at Point Arena was first lit in 1870. An earthquake in 1906 damaged the tower so badly "
         "that it had to be rebuilt, and the new tower, finished in 1908, was the first lighthouse in the United "
         "States built of steel-reinforced concrete. Its lens was made in France and weighs more than six tons.")

TASKS: dict[str, str] = {
    "repeat-list": ("Here is a shopping list: apples, bread, carrots, dates, eggs, flour, grapes, honey, ice cream, "
                    "jam, kale, lemons, milk, noodles, oranges. Repeat the whole list exactly, in the same order, "
                    "but write potatoes instead of carrots."),
    "quote": (f"Text: {_TEXT}\n\nQuote, word for word, the sentences of the text that say when the tower was "
              "rebuilt and what it was built of."),
    "edit-code": f"Rename the variable `total` to `paid_total` in this Python function and print the whole "
                 f"function:\n\n{_CODE}",
}


def task_prompts(tokenizer, vocab_size: int, seed: int = 0) -> dict[str, list[int]]:
    """Token ids of each task's prompt (chat template applied where the tokenizer has one)."""
    if tokenizer is None:
        rng = random.Random(seed)
        block = [rng.randrange(vocab_size) for _ in range(24)]
        return {name: block * 3 for name in TASKS}
    prompts = {}
    for name, text in TASKS.items():
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prompt = text
        prompts[name] = list(tokenizer.encode(prompt, add_special_tokens=False))
    return prompts
