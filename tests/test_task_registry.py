"""register_task: a user's declarative multiple-choice task and a Task subclass run like the shipped tasks."""

from __future__ import annotations

import pytest

from melayer.eval import data as D
from melayer.eval import run
from melayer.eval.tasks import (
    REGISTRY,
    MultipleChoice,
    Sample,
    Task,
    TaskOption,
    get_task,
    register_task,
    unregister_task,
)
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError


def _flat_arc() -> list[dict]:
    # ARC flattened into plain keys, so templates can be strings
    return [{"qid": d["id"], "stem": d["question"]["stem"], "texts": [c["text"] for c in d["question"]["choices"]],
             "answer": next(c["text"] for c in d["question"]["choices"] if c["label"] == d["answerKey"])}
            for d in D.arc("easy")[:12]]


@pytest.fixture
def own_task():
    task = register_task(MultipleChoice(name="my_arc", description="ARC-Easy, declared as a user would",
                                        docs=_flat_arc, doc_id="{qid}", context="Question: {stem}\nAnswer:",
                                        choices=lambda d: d["texts"], target="{answer}"))
    yield task
    unregister_task("my_arc")


def test_declarative_task_scores_like_the_shipped_arc(own_task):
    assert "my_arc" in REGISTRY and REGISTRY["my_arc"].describe()["family"] == "loglik"
    lm = tiny_lm("llama")
    mine = run(lm, "my_arc", limit=12, batch_size=4, progress=False).records
    ref = run(lm, "arc_easy", limit=12, batch_size=4, progress=False).records
    assert [r["id"] for r in mine] == [r["id"] for r in ref]
    for a, b in zip(mine, ref):
        assert a["logliks"] == b["logliks"] and a["gold"] == b["gold"] and a["metrics"] == b["metrics"]


def test_register_errors(own_task):
    with pytest.raises(MelayerError, match="already registered"):
        register_task(own_task)
    with pytest.raises(MelayerError, match="template"):
        bad = MultipleChoice(name="bad_ctx", docs=_flat_arc, context="{nope}", choices=lambda d: d["texts"],
                             target="{answer}")
        bad.request(bad.load(1)[0])
    with pytest.raises(MelayerError, match="not one of its choices"):
        bad = MultipleChoice(name="bad_target", docs=_flat_arc, context="{stem}", choices=lambda d: d["texts"],
                             target="{stem}")
        bad.request(bad.load(1)[0])
    with pytest.raises(MelayerError, match="letters, digits"):
        register_task(MultipleChoice(name="a b"))


def test_register_a_task_class_with_an_option():
    option = TaskOption("word_count", int, 3, "how many words")

    @register_task("count_words", options=(option,))
    class CountWords(Task):
        family: str = "perplexity"

        def _load(self, lm):
            return [Sample(f"w{i}", {"n": i}) for i in range(self.options["word_count"])]

    try:
        assert get_task("count_words").load() and len(get_task("count_words", word_count=5).load()) == 5
        with pytest.raises(MelayerError, match="type int"):
            get_task("count_words", word_count="many")
        with pytest.raises(MelayerError, match="takes no option"):
            get_task("count_words", window=3)
    finally:
        unregister_task("count_words")
    assert "count_words" not in REGISTRY
