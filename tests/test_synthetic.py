"""The demo generator: deterministic, within its configured sizes, and its truth matches its text."""

import re
from collections import defaultdict

import pyarrow.parquet as pq
import pytest

from alignx_ray.fixtures import synthetic
from alignx_ray.fixtures.synthetic import HIGH, LOW, N_DIMS, NEUTRAL, SyntheticConfig

SMALL = SyntheticConfig(n_threads=40, n_users=15, seed=7)


@pytest.fixture(scope="module")
def generated():
    return synthetic.generate(SMALL)


def _word(word: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)


def _cue(dim: int, level: int) -> re.Pattern:
    """The whole-word pattern of the cue that marks pole `level` (HIGH or LOW) of `dim`."""
    return _word(synthetic.phrase_bank()["dimensions"][dim]["high_cue" if level == HIGH else "low_cue"])


def _by_id(threads):
    return {r["response_id"]: r["text"] for t in threads for r in t["responses"]}


def _bank_parts():
    """(dimension, pole, sentence) for every trait sentence, and every other sentence of the bank."""
    bank = synthetic.phrase_bank()
    sentences = [(j, lv, s) for j in range(N_DIMS) for lv in (HIGH, LOW) for s in synthetic.templates(j, lv)]
    others = [s for t in bank["topics"] for s in (t["name"], *t["post"], *t["filler"])]
    others += bank["post_openers"] + bank["post_closers"] + bank["generic_filler"]
    return sentences, others


def test_phrase_bank_shape_and_sentence_lengths():
    sentences, _ = _bank_parts()
    for d in synthetic.phrase_bank()["dimensions"]:
        assert {"label", "high_cue", "low_cue", "high", "low"} <= set(d)
        assert len(d["high"]) == 3 and len(d["low"]) == 3
        assert not set(d["high"]) & set(d["low"])
    for _, _, sentence in sentences:
        assert 6 <= len(sentence.split()) <= 16, sentence


def test_cues_are_single_lowercase_words_all_distinct():
    dims = synthetic.phrase_bank()["dimensions"]
    cues = [d[key] for d in dims for key in ("high_cue", "low_cue")]
    assert len(cues) == 2 * N_DIMS and len(set(cues)) == 2 * N_DIMS
    assert all(re.fullmatch(r"[a-z]+", c) for c in cues), cues


def test_each_cue_occurs_in_exactly_the_sentences_of_its_pole():
    sentences, others = _bank_parts()
    for i in range(N_DIMS):
        for level in (HIGH, LOW):
            cue = _cue(i, level)
            for j, lv, sentence in sentences:
                assert bool(cue.search(sentence)) == (i == j and lv == level), (cue.pattern, sentence)
            assert not any(cue.search(s) for s in others), cue.pattern


def test_interest_tags_stay_in_their_own_dimension():
    dims = synthetic.phrase_bank()["dimensions"]
    sentences, _ = _bank_parts()
    tags = {i: dims[i]["label"].removeprefix("Likes ") for i in range(47, N_DIMS)}
    assert tags[47] == "science" and tags[76] == "painting" and tags[89] == "fashion"
    assert dims[76]["high_cue"] == "easel" and dims[76]["low_cue"] == "brushes"
    for i, tag in tags.items():
        assert not any(_word(tag).search(s) for j, _, s in sentences if j != i), tag
        assert dims[i]["high_cue"] != tag and dims[i]["low_cue"] != tag


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = synthetic.write_threads(SMALL, tmp_path / "a")["jsonl"].read_bytes()
    b = synthetic.write_threads(SMALL, tmp_path / "b")["jsonl"].read_bytes()
    other = SyntheticConfig(n_threads=40, n_users=15, seed=8)
    c = synthetic.write_threads(other, tmp_path / "c")["jsonl"].read_bytes()
    assert a == b
    texts = lambda cfg: [r["text"] for t in synthetic.generate_threads(cfg) for r in t["responses"]]
    assert texts(SMALL) != texts(other) and a != c


def test_sizes_within_configured_ranges(generated):
    threads, truth = generated
    assert len(threads) == SMALL.n_threads
    lo, hi = SMALL.responses_per_thread
    assert all(lo <= len(t["responses"]) <= hi for t in threads)
    assert len(truth) == sum(len(t["responses"]) for t in threads)
    per_user = defaultdict(set)
    for row in truth:
        planted = sum(level != NEUTRAL for level in row["levels"])
        assert SMALL.traits_per_response[0] <= planted <= SMALL.traits_per_response[1]
        per_user[row["user_id"]] |= {d for d, lv in enumerate(row["levels"]) if lv != NEUTRAL}
    assert all(len(dims) <= SMALL.traits_per_user[1] for dims in per_user.values())
    assert len({t["post"] for t in threads}) > len(threads) // 2


def test_levels_match_the_text(generated):
    threads, truth = generated
    texts = _by_id(threads)
    for row in truth:
        text, levels = texts[row["response_id"]], row["levels"]
        assert len(levels) == N_DIMS and set(levels) <= {LOW, NEUTRAL, HIGH}
        for d, level in enumerate(levels):
            if level == NEUTRAL:
                assert not _cue(d, HIGH).search(text) and not _cue(d, LOW).search(text), (d, text)
                continue
            assert _cue(d, level).search(text), (d, text)
            assert not _cue(d, HIGH + LOW - level).search(text), (d, text)
            assert any(s in text for s in synthetic.templates(d, level))
            assert not any(s in text for s in synthetic.templates(d, HIGH + LOW - level))


def test_filler_counts_within_range(generated):
    threads, truth = generated
    texts = _by_id(threads)
    lo, hi = SMALL.filler_sentences
    for row in truth:
        n_sentences = len(re.findall(r"[.?!](?:\s|$)", texts[row["response_id"]]))
        planted = sum(level != NEUTRAL for level in row["levels"])
        assert planted + lo <= n_sentences <= planted + hi


def test_users_are_consistent_and_recur(generated):
    _, truth = generated
    seen = defaultdict(dict)
    for row in truth:
        for d, level in enumerate(row["levels"]):
            if level != NEUTRAL:
                assert seen[row["user_id"]].setdefault(d, level) == level
    assert len(seen) <= SMALL.n_users
    assert len(truth) > len(seen)


def test_ids_unique_and_stable(generated):
    threads, truth = generated
    thread_ids = [t["thread_id"] for t in threads]
    response_ids = [r["response_id"] for t in threads for r in t["responses"]]
    assert len(set(thread_ids)) == len(thread_ids) and thread_ids[0] == "t7-00000"
    assert len(set(response_ids)) == len(response_ids)
    assert [r["response_id"] for r in truth] == response_ids
    assert all(r["response_id"].startswith(r["thread_id"] + "-r") for r in truth)


def test_written_files_read_back_equal(tmp_path, generated):
    import json

    threads, truth = generated
    paths = synthetic.write_threads(SMALL, tmp_path)
    lines = paths["jsonl"].read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == threads
    assert pq.read_table(paths["threads"]).to_pylist() == threads
    assert pq.read_table(paths["truth"]).to_pylist() == truth


def test_iter_examples_pairs_posts_texts_and_levels(generated):
    threads, truth = generated
    examples = list(synthetic.iter_examples(SMALL))
    assert len(examples) == len(truth)
    post, text, levels = examples[0]
    assert post == threads[0]["post"] and text == threads[0]["responses"][0]["text"]
    assert levels == truth[0]["levels"]


def test_corpus_text_covers_every_template_and_cue():
    corpus = set(synthetic.corpus_text())
    assert all(s in corpus for d in range(N_DIMS) for lv in (LOW, HIGH) for s in synthetic.templates(d, lv))
    dims = synthetic.phrase_bank()["dimensions"]
    assert all(d[key] in corpus for d in dims for key in ("high_cue", "low_cue"))


def test_bad_ranges_are_rejected():
    with pytest.raises(ValueError):
        SyntheticConfig(responses_per_thread=(5, 2))
    # Users cannot hold more traits than there are dimensions to plant.
    with pytest.raises(ValueError):
        SyntheticConfig(planted_dimensions=(1, 2, 3), traits_per_user=(2, 4))
    assert SyntheticConfig(planted_dimensions=None, traits_per_user=(2, 40)).pool() == list(range(90))
