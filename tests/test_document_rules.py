"""The document rules of ``ModelAdapter.documents(split, rule)``: auto, heading, file and blocks.

``blocks`` is checked against a reference that shares no code with trime's: the raw text cut into
lines (universal newlines, as the split is tokenized), the blocks found there (a run of non-blank lines
after a blank one; the first block starts the text), and each block's first character mapped to the
token covering it by the tokenizer's own offset mapping (Hugging Face) or by counting a line's words
plus its ``<eos>`` (fairseq word level) or reading the lines of fairseq's ``load_indexed_dataset``
(byte level). Tokenizers: the tests' byte-level BPE (GPT-2 style) and a SentencePiece-style BPE with
byte fallback that prepends ``▁`` (Llama 2's legacy conversion). Texts: the shipped WikiText-2 sample
(articles and paragraphs between ``" "`` lines) and a text of edge cases (blank lines before the first
block, runs of empty, whitespace-only, CRLF, lone CR and no-break-space lines, an indented block, a first
line longer than a title, non-ASCII text, no newline at the end).
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tests.hf_helpers as H
from tests.eval_helpers import BIN, tiny_checkpoints
from tests.test_token_cache import llama_tokenizer
from tests.tiny_lm import tiny_lm_argv
from trime.adapters.base import BLOCK_TITLE_CHARS, DOCUMENT_RULES
from trime.errors import TrimeError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module

EDGE_TEXT = (
    "\n \n"  # blank lines before the first block belong to it
    "First block, line one: ünïcödé ☃\n"
    "still the first block\n"
    "\n"
    "Second block: " + "long " * 30 + "\n"  # a first line longer than a title
    " \t \n\n"
    "  indented third block   \n"
    "\r\n"  # CRLF: an empty line once newlines are read universally
    "fourth block 😀 emoji\r\n"
    "and a lone CR\rinside it\n"
    "\n\n\n"
    "\u00a0\n"  # a no-break space only: blank
    "fifth block, no newline at the end"
)
WIKITEXT_HEADING = re.compile(r" = (?!= )(.+?)(?<! =) = ")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message.startswith("trime: error: ") and "\n" not in message, message
    return message


def universal_text(path: Path) -> str:
    with open(path, encoding="utf-8", newline=None) as f:
        return f.read()


def reference_blocks(text: str) -> list[tuple[int, str]]:
    """(character offset, title) of each block of ``text``: a block starts at a line with text after a blank line
    or at the first line with text; the first block starts at character 0."""
    found, offset, previous_blank = [], 0, True
    for line in text.split("\n"):
        blank = re.fullmatch(r"\s*", line) is not None
        if previous_blank and not blank:
            title = line.strip()[:BLOCK_TITLE_CHARS].rstrip()
            found.append((0 if not found else offset, title))
        previous_blank = blank
        offset += len(line) + 1
    return found


def reference_headings(text: str) -> list[tuple[int, str]]:
    """(character offset, title) of each WikiText article heading line (the sample starts with a blank line)."""
    found, offset = [], 0
    for line in text.split("\n"):
        match = WIKITEXT_HEADING.fullmatch(line)
        if match:
            found.append((0 if not found else offset, match.group(1)))
        offset += len(line) + 1
    return found


def token_starts(tokenizer, text: str, chars: list[int]) -> tuple[np.ndarray, list[int]]:
    """(the text's ids, the position of the token covering each character offset), by the tokenizer's offsets.

    Character 0 is the start of the stream (a token the tokenizer prepends included)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = np.asarray([end for _, end in encoded["offset_mapping"]])
    return np.asarray(encoded["input_ids"]), [0 if c == 0 else int(np.argmax(ends > c)) for c in chars]


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    """Model dirs: the tests' tiny GPT-2 with its byte-level BPE, and a tiny Llama with the legacy SentencePiece-style
    tokenizer (a ``▁`` prepended to the text, bytes outside the vocabulary as ``<0xNN>``)."""
    tokenizer = llama_tokenizer("legacy")
    llama = tmp_path_factory.mktemp("rules_llama") / "model"
    H.build_model("llama", vocab_size=len(tokenizer)).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    return {"gpt2": H.model_dir("gpt2"), "legacy": llama}


def wikitext(tokenizer: str) -> str:
    """The WikiText-2 valid sample; for the legacy tokenizer without its ``<unk>`` words, since that tokenizer prepends
    a ``▁`` after each special token it matches in the text (bytes the text does not have: no document rule but
    ``file`` can locate anything in such a stream, a case tested below)."""
    text = universal_text(H.SAMPLE_VALID)
    return text.replace("<unk>", "unk") if tokenizer == "legacy" else text


def hf_adapter(model: Path, data: Path, text: str | None = None, source: Path | None = None):
    """The adapter of ``model`` over DATA ``data`` whose train.txt is ``text`` (written as bytes) or a copy of ``source``."""
    from trime.adapters import load_adapter

    data.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copyfile(source, data / "train.txt")
    else:
        (data / "train.txt").write_bytes(text.encode("utf-8"))
    return load_adapter(model, data, cpu=True)


@pytest.mark.parametrize("tokenizer", ["gpt2", "legacy"])
@pytest.mark.parametrize("which", ["edge", "wikitext"])
def test_hf_blocks_start_at_the_token_covering_each_blocks_first_character(model_dirs, tmp_path, tokenizer, which):
    lm = hf_adapter(model_dirs[tokenizer], tmp_path / "data", EDGE_TEXT if which == "edge" else wikitext(tokenizer))
    text = universal_text(tmp_path / "data" / "train.txt")
    blocks = reference_blocks(text)
    ids, starts = token_starts(lm.tokenizer, text, [c for c, _ in blocks])
    np.testing.assert_array_equal(lm.stream("train"), ids)
    assert all(a < b for a, b in zip(starts, starts[1:]))
    docs = lm.documents("train", "blocks")
    assert docs.by == "blocks"
    assert docs.titles == [title for _, title in blocks]
    assert docs.starts == starts
    if which == "edge":
        assert len(docs.starts) == 5 and docs.titles[0] == "First block, line one: ünïcödé ☃"
        assert docs.titles[1] == ("Second block: " + "long " * 30)[:BLOCK_TITLE_CHARS].rstrip()
        assert docs.titles[2:] == ["indented third block", "fourth block 😀 emoji", "fifth block, no newline at the end"]
    else:  # every heading line and every paragraph of the five articles
        assert docs.titles[0] == "= Homarus gammarus =" and len(docs.starts) > 5 * 3
    # each block's text starts in its first token (the token may begin with the blank lines before it)
    for (char, _), start, end in zip(blocks, docs.starts, docs.starts[1:] + [len(ids)]):
        piece = lm.decode(ids[start:end])
        line = text[char:].split("\n")[0]
        assert line.strip()[:10] in piece


@pytest.mark.parametrize("tokenizer", ["gpt2", "legacy"])
def test_hf_heading_auto_and_file_rules(model_dirs, tmp_path, tokenizer):
    lm = hf_adapter(model_dirs[tokenizer], tmp_path / "wiki", wikitext(tokenizer))
    text = universal_text(tmp_path / "wiki" / "train.txt")
    headings = reference_headings(text)
    _, starts = token_starts(lm.tokenizer, text, [c for c, _ in headings])
    for rule in ("heading", "auto"):
        docs = lm.documents("train", rule)
        assert (docs.by, docs.starts, docs.titles) == ("heading", starts, [t for _, t in headings]), rule
    assert len(starts) == 5
    whole = lm.documents("train", "file")
    assert (whole.by, whole.starts, whole.titles) == ("file", [0], ["train.txt"])

    plain = hf_adapter(model_dirs[tokenizer], tmp_path / "plain", EDGE_TEXT)
    auto = plain.documents("train")  # the default rule
    assert (auto.by, auto.starts, auto.titles) == ("file", [0], ["train.txt"])
    with pytest.raises(TrimeError) as err:
        plain.documents("train", "heading")
    assert one_line(err) == (
        f"trime: error: --documents heading: {tmp_path / 'plain' / 'train.txt'} has no WikiText article heading line "
        "(' = Title = '); use --documents blocks or file, or auto to fall back to one document per file"
    )
    with pytest.raises(TrimeError) as err:
        plain.documents("train", "paragraphs")
    assert one_line(err) == f"trime: error: --documents must be one of {', '.join(DOCUMENT_RULES)}; got 'paragraphs'"


def test_hf_text_without_a_non_blank_line_is_one_block(model_dirs, tmp_path):
    lm = hf_adapter(model_dirs["gpt2"], tmp_path / "data", " \n\n \t\n")
    docs = lm.documents("train", "blocks")
    assert (docs.by, docs.starts, docs.titles) == ("blocks", [0], ["train.txt"])


def test_hf_a_tokenizer_that_does_not_spell_the_bytes_refuses_explicit_rules(model_dirs, tmp_path):
    """A normalizer that rewrites characters: the tokens' bytes no longer add up to the file's."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(model_dirs["gpt2"], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("é", "e")
    tokenizer.save_pretrained(model)
    text = " = Café = \n \n Crème brûlée .\n \n Second block .\n"
    lm = hf_adapter(model, tmp_path / "data", text)
    auto = lm.documents("train")
    assert (auto.by, auto.starts) == ("file", [0])
    for rule in ("heading", "blocks"):
        with pytest.raises(TrimeError) as err:
            lm.documents("train", rule)
        message = one_line(err)
        assert f"--documents {rule}: the tokens of --path {model}'s tokenizer do not spell the bytes of" in message
        assert message.endswith("use --documents file")


# ----------------------------------------------------------------------------- fairseq, word level


@pytest.fixture(scope="module")
def ce_checkpoint(tmp_path_factory, wt2_sample_bin) -> Path:
    return tiny_checkpoints(tmp_path_factory, wt2_sample_bin)["ce"]


def fairseq_reference_blocks(lines: list[str], known: set) -> tuple[list[int], list[str], int]:
    """(start positions, titles, stream length) of the blocks of word-level lines: each line is its words + <eos>,
    a word outside the dictionary is <unk>, a line without words is blank."""
    words = [line.split() for line in lines]
    line_starts = np.cumsum([0] + [len(w) + 1 for w in words])
    starts, titles = [], []
    for i, w in enumerate(words):
        if w and (i == 0 or not words[i - 1]):
            starts.append(0 if not starts else int(line_starts[i]))
            titles.append(" ".join(x if x in known else "<unk>" for x in w)[:BLOCK_TITLE_CHARS].rstrip())
    return starts, titles, int(line_starts[-1])


def test_fairseq_word_level_rules_on_the_wikitext_sample(ce_checkpoint, wt2_sample_bin):
    from trime.adapters import load_adapter

    lm = load_adapter(ce_checkpoint, wt2_sample_bin, cpu=True)
    lines = universal_text(H.SAMPLE_VALID).split("\n")[:-1]
    starts, titles, n = fairseq_reference_blocks(lines, set(lm.dictionary.indices))
    assert n == len(lm.stream("valid"))
    docs = lm.documents("valid", "blocks")
    assert (docs.by, docs.starts, docs.titles) == ("blocks", starts, titles)
    assert docs.titles[0] == "= <unk> <unk> =" and len(starts) > 5 * 3
    heading_lines = [i for i, line in enumerate(lines) if WIKITEXT_HEADING.fullmatch(line)]
    line_starts = np.cumsum([0] + [len(line.split()) + 1 for line in lines])
    for rule in ("heading", "auto"):
        got = lm.documents("valid", rule)
        assert got.by == "heading" and got.starts == [0] + [int(line_starts[i]) for i in heading_lines[1:]], rule
        assert len(got.titles) == 5 and got.titles[2] == "M @-@ 82 ( Michigan highway )"
    assert lm.documents("valid", "file").starts == [0] and lm.documents("valid", "file").titles == ["valid.bin"]


def binarize(lines: list[str], dict_dir: Path, out: Path) -> Path:
    """A word-level data-bin of ``lines`` as its valid split, with the dictionary of ``dict_dir``, by fairseq's builder."""
    from fairseq.data import Dictionary, indexed_dataset

    out.mkdir(parents=True)
    shutil.copyfile(dict_dir / "dict.txt", out / "dict.txt")
    vocab = Dictionary.load(str(out / "dict.txt"))
    builder = indexed_dataset.make_builder(str(out / "valid.bin"), impl="mmap", vocab_size=len(vocab))
    for line in lines:
        builder.add_item(vocab.encode_line(line, add_if_not_exist=False, append_eos=True))
    builder.finalize(str(out / "valid.idx"))
    return out


def test_fairseq_word_level_blocks_of_edge_cases(ce_checkpoint, wt2_sample_bin, tmp_path):
    from trime.adapters import load_adapter

    lines = EDGE_TEXT.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lm = load_adapter(ce_checkpoint, binarize(lines, wt2_sample_bin, tmp_path / "bin"), cpu=True)
    starts, titles, n = fairseq_reference_blocks(lines, set(lm.dictionary.indices))
    assert n == len(lm.stream("valid")) and len(starts) == 5
    docs = lm.documents("valid", "blocks")
    assert (docs.by, docs.starts, docs.titles) == ("blocks", starts, titles)
    assert lm.documents("valid").by == "file"
    with pytest.raises(TrimeError) as err:
        lm.documents("valid", "heading")
    assert one_line(err).startswith(f"trime: error: --documents heading: {tmp_path / 'bin' / 'valid.bin'} has no")

    blank = load_adapter(ce_checkpoint, binarize(["", " ", "\t"], wt2_sample_bin, tmp_path / "blank"), cpu=True)
    got = blank.documents("valid", "blocks")
    assert (got.by, got.starts, got.titles) == ("blocks", [0], ["valid.bin"])


# ----------------------------------------------------------------------------- fairseq, byte level


@pytest.mark.slow
def test_fairseq_byte_level_blocks(enwik8_sample_bin, tmp_path):
    """Byte level: a line of ASCII whitespace bytes is blank; titles are the line's bytes as text (a one-update
    checkpoint on the enwik8 sample's data-bin, since a checkpoint reads only the data-bin it was trained with)."""
    from fairseq.data import data_utils

    from trime.adapters import load_adapter

    save = tmp_path / "ckpt"
    argv = [str(BIN / "fairseq-train"), str(enwik8_sample_bin), "--task", "language_modeling",
            *tiny_lm_argv(16, layers=1, io_dims=True, tokens_per_sample=32, max_tokens=256, lr="0.001"),
            "--criterion", "cross_entropy", "--sample-break-mode", "none", "--max-update", "1",
            "--no-epoch-checkpoints", "--disable-validation", "--log-format", "none", "--save-dir", str(save)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lm = load_adapter(save / "checkpoint_last.pt", enwik8_sample_bin, cpu=True)
    assert json.loads((enwik8_sample_bin / "trime_meta.json").read_text())["level"] == "byte"

    items = data_utils.load_indexed_dataset(str(enwik8_sample_bin / "train"), lm.dictionary)
    symbols = lm.dictionary.symbols
    starts, titles, position, previous_blank = [], [], 0, True
    for i in range(len(items)):
        line = bytes(int(symbols[t]) for t in items[i].tolist()[:-1])  # a byte's symbol is its value; <eos> ends it
        blank = all(b < 128 and chr(b).isspace() for b in line)
        if previous_blank and not blank:
            starts.append(0 if not starts else position)
            titles.append(line.decode("utf-8", errors="replace").strip()[:BLOCK_TITLE_CHARS].rstrip())
        previous_blank = blank
        position += len(line) + 1
    assert position == len(lm.stream("train")) and len(starts) > 100
    docs = lm.documents("train", "blocks")
    assert (docs.by, docs.starts) == ("blocks", starts)
    assert docs.titles == titles
