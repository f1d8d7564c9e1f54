"""Fifty varied prompts for the real-model equality tests: chat, code, copy-heavy, open-ended; short to long."""
from __future__ import annotations

_PASSAGE = ("The Rhine rises in the Swiss Alps, flows through Lake Constance, forms part of the border between "
            "Germany and France, and reaches the North Sea in the Netherlands. It is about 1,230 kilometres long "
            "and has carried trade since Roman times. Major cities on its banks include Basel, Strasbourg, "
            "Mannheim, Cologne, Düsseldorf and Rotterdam.")
_CODE = ("def total_price(items, tax_rate):\n    total = 0\n    for item in items:\n        total += item['price'] * "
         "item['qty']\n    return total * (1 + tax_rate)\n")
_LIST = "apples: 3\nbread: 1 loaf\nmilk: 2 litres\neggs: 12\ncoffee: 500 g\nrice: 1 kg"
_LOG = ("2026-11-02 10:01:07 INFO server started on port 8080\n2026-11-02 10:01:09 WARN cache miss ratio 0.42\n"
        "2026-11-02 10:02:13 ERROR timeout talking to db-primary after 30s\n"
        "2026-11-02 10:02:14 INFO retrying with db-replica\n2026-11-02 10:02:15 INFO request served in 812 ms")

CHAT = [
    "What is the capital of Australia?",
    "Give me three tips for sleeping better.",
    "Explain what a hash table is to a beginner.",
    "Write a haiku about autumn rain.",
    "How do I convert Celsius to Fahrenheit?",
    "What are the main differences between TCP and UDP?",
    "Suggest a name for a bakery that sells only croissants.",
    "Tell me a short story about a lighthouse keeper.",
    "Why is the sky blue?",
    "List five common houseplants that are easy to care for.",
    "Write a polite email declining a meeting invitation.",
    "What is photosynthesis?",
]
COPY = [
    f"Repeat the following text exactly:\n\n{_PASSAGE}",
    f"Rewrite this shopping list as a markdown table with columns Item and Amount:\n{_LIST}",
    f"Summarise this passage in two sentences:\n\n{_PASSAGE}",
    f"Extract every city name from this text as a bulleted list:\n\n{_PASSAGE}",
    f"Add type hints and a docstring to this function:\n```python\n{_CODE}```",
    f"Rename the variable `total` to `subtotal` in this code and show the full result:\n```python\n{_CODE}```",
    f"Which lines of this log are errors or warnings? Quote them.\n\n{_LOG}",
    f"Convert this log to JSON lines with fields time, level and message:\n\n{_LOG}",
    f"Translate this list into French, keeping the amounts:\n{_LIST}",
    f"Answer from the text only: how long is the Rhine?\n\n{_PASSAGE}",
    f"Write unit tests with pytest for this function:\n```python\n{_CODE}```",
    f"Sort this list alphabetically:\n{_LIST}",
]
CODE = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a function in Python to compute the nth Fibonacci number iteratively.",
    "Write a SQL query that returns the ten most recent orders from a table named orders.",
    "Write a bash one-liner that counts the lines in all .py files in a folder.",
    "Implement binary search in Python.",
    "Write a JavaScript function that debounces another function.",
    "Write a Python class for a stack with push, pop and peek.",
    "Show how to read a CSV file with pandas and print the first five rows.",
]
RAW = [  # plain text continuation, no chat template
    "def quicksort(arr):",
    "The three laws of thermodynamics are",
    "Once upon a time, in a small village by the sea,",
    "import numpy as np\n\n",
    "Q: What is 17 times 23?\nA:",
    "Monday, Tuesday, Wednesday,",
    "<html>\n<head>\n<title>",
    "1, 2, 3, 4, 5, 6,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    f"{_PASSAGE}\n\nIn summary,",
    "# Installation\n\nTo install the package, run",
    "Dear hiring manager,\n\nI am writing to apply for",
    "SELECT name, email FROM users WHERE",
    "Roses are red,\nviolets are blue,",
    "The mitochondria is",
    f"{_CODE}\n# Example usage:\n",
    "A list of prime numbers: 2, 3, 5, 7,",
    "In 1969, Apollo 11",
]


def prompts() -> list:
    """50 prompts: chat messages for the instruct model, plus raw strings."""
    messages = [[{"role": "user", "content": p}] for p in CHAT + COPY + CODE]
    multi_turn = [[{"role": "user", "content": "What is a prime number?"},
                   {"role": "assistant", "content": "A prime number is a whole number greater than 1 whose only "
                                                    "divisors are 1 and itself."},
                   {"role": "user", "content": "List the primes below 30."}]]
    return messages + multi_turn + RAW[: 50 - len(messages) - 1]
