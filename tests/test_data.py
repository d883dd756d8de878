"""Dataset loaders: the shared benchmark files, the embedded sets, every layout, and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rosa2.cli import main
from rosa2.config import DataConfig
from rosa2.data import KNOWN, fingerprint, load_problems
from rosa2.data.layouts import LAYOUTS
from rosa2.errors import Rosa2Error
from rosa2.rewards import reward_for

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(dataset: str, **kw) -> list:
    return load_problems(DataConfig(dataset=dataset, **kw))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "dataset, count, first_id",
    [
        (f"math-500:{DATA / 'math500.jsonl'}", 500, "math-500:0"),
        (f"gsm8k:{DATA / 'gsm8k_test.jsonl'}", 1319, "gsm8k:0"),
        (f"aime24:{DATA / 'aime24.jsonl'}", 30, "aime24:60"),
        (f"humaneval:{DATA / 'humaneval.jsonl.gz'}", 164, "humaneval:HumanEval/0"),
    ],
)
def test_shared_files_load_with_a_named_layout(dataset, count, first_id):
    problems = load(dataset)
    assert len(problems) == count and problems[0].id == first_id
    assert len({p.id for p in problems}) == count
    for p in problems:
        if p.domain == "math":
            assert p.answer and "\\boxed{}" in p.prompt and p.metadata["question"] in p.prompt
        else:
            assert p.domain == "code" and p.tests and "def check(candidate)" in p.tests and p.entry_point
            assert p.metadata["stub"] in p.prompt and "```python" in p.prompt and p.answer is None


def test_gsm8k_answer_is_the_number_after_hashes():
    problems = load(f"gsm8k:{DATA / 'gsm8k_test.jsonl'}")
    assert problems[0].answer == "18"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in problems)
    assert problems[0].metadata["solution"].endswith("#### 18")


def test_bare_paths_are_recognised_by_their_fields():
    for file, named in (("math500.jsonl", "math-500"), ("gsm8k_test.jsonl", "gsm8k"), ("humaneval.jsonl.gz", "humaneval")):
        bare, explicit = load(str(DATA / file)), load(f"{named}:{DATA / file}")
        assert [(p.prompt, p.answer, p.tests) for p in bare] == [(p.prompt, p.answer, p.tests) for p in explicit]


def test_parquet_loads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "aime24.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "aime.parquet")
    assert fingerprint(load(f"aime24:{tmp_path / 'aime.parquet'}")) == fingerprint(load(f"aime24:{DATA / 'aime24.jsonl'}"))


def test_default_is_embedded_math_deterministic_and_its_golds_verify():
    problems = load_problems(DataConfig())
    assert DataConfig().dataset == "embedded-math" and len(problems) == 50
    assert fingerprint(problems) == fingerprint(load("embedded-math"))
    assert len({p.metadata["template"] for p in problems}) == 7
    for p in problems:
        assert reward_for(p).score(f"So the answer is \\boxed{{{p.answer}}}.").reward == 1.0, p


def _solve(question: str, options: list[str]) -> str:
    """The right option of an embedded-choice question, computed from its text alone."""
    numbers = [int(o) for o in options]
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
        right = int(m[1]) + int(m[2])
    elif m := re.search(r"has (\d+) \w+ and gets (\d+) more", question):
        right = int(m[1]) + int(m[2])
    elif "largest" in question:
        right = max(numbers)
    elif "smallest" in question:
        right = min(numbers)
    elif "even" in question:
        (right,) = [n for n in numbers if n % 2 == 0]
    else:
        shown = [int(n) for n in re.findall(r"\d+", question)]
        right = shown[-1] + shown[1] - shown[0]
    assert numbers.count(right) == 1, (question, options)
    return "ABCD"[numbers.index(right)]


def test_embedded_choice_is_deterministic_balanced_and_its_golds_are_right():
    problems = load("embedded-choice")
    assert len(problems) == 48 and fingerprint(problems) == fingerprint(load("embedded-choice"))
    assert Counter(p.metadata["subject"] for p in problems[:6]) == Counter(
        {"add": 1, "largest": 1, "smallest": 1, "story": 1, "even": 1, "next": 1})
    for p in problems:
        assert p.domain == "choice" and len(p.metadata["choices"]) == 4
        assert p.answer == _solve(p.metadata["question"], p.metadata["choices"]), p
        assert reward_for(p).score(f"\\boxed{{{p.answer}}}").reward == 1.0
    assert Counter(p.answer for p in problems).most_common(1)[0][1] <= 20  # the gold is not one letter


@pytest.mark.parametrize("limit, count", [(8, 8), (0.25, 12), (0.01, 1), (8.0, 8)])
def test_limit_takes_a_count_or_a_share_of_the_dataset(limit, count):
    assert len(load("embedded-choice", limit=limit)) == count


@pytest.mark.parametrize("text, value", [("8", 8), ("0.25", 0.25), ("25%", 0.25), ("8.0", 8.0)])
def test_limit_option_reads_counts_fractions_and_percentages(text, value):
    from rosa2.config import limit_value

    assert limit_value(text) == value


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "150%", "many", "0%"])
def test_limit_option_refuses_what_is_neither_a_count_nor_a_share(bad, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--limit", bad, "--help"])
    err = capsys.readouterr().err
    assert "--limit" in err and bad in err


def test_embedded_humaneval_is_the_shared_file():
    embedded, shared = load("humaneval"), load(f"humaneval:{DATA / 'humaneval.jsonl.gz'}")
    assert len(embedded) == 164 and fingerprint(embedded) == fingerprint(shared)


def test_shuffle_then_limit_is_reproducible_and_fingerprinted():
    a, b = load("embedded-math", shuffle_seed=7, limit=10), load("embedded-math", shuffle_seed=7, limit=10)
    assert [p.id for p in a] == [p.id for p in b] and len(a) == 10
    assert fingerprint(a) == fingerprint(b) != fingerprint(load("embedded-math", limit=10))


def test_choice_layouts_letter_the_options_and_the_gold(tmp_path):
    gpqa = write_jsonl(tmp_path / "gpqa.jsonl", [
        {"Record ID": f"rec{i}", "Question": f"Q{i}?", "Correct Answer": f"right{i}",
         "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(24)
    ])
    problems = load(str(gpqa))
    assert [p.id for p in problems][:2] == ["gpqa:rec0", "gpqa:rec1"]
    letters = Counter(p.answer for p in problems)
    assert len(letters) > 1  # the correct answer no longer sits at A
    named = load(f"gpqa-diamond:{gpqa}")  # same shuffle whatever the file is called
    assert [(p.prompt, p.answer) for p in named] == [(p.prompt, p.answer) for p in problems]
    assert named[0].id == "gpqa-diamond:rec0"
    for p in problems:
        index = "ABCD".index(p.answer)
        assert p.metadata["choices"][index] == f"right{p.id.split('rec')[1]}"
        assert f"{p.answer}) right" in p.prompt and "\\boxed{A}" in p.prompt
        assert reward_for(p).score(f"\\boxed{{{p.answer}}}").reward == 1.0

    mmlu = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"}])
    (p,) = load(str(mmlu))
    assert (p.domain, p.answer, p.id) == ("choice", "B", "mmlu:math/0")
    sgpqa = write_jsonl(tmp_path / "sg.jsonl", [{"uuid": "u1", "question": "Pick J", "options": list("abcdefghij"), "answer_letter": "J"}])
    (p,) = load(str(sgpqa))
    assert (p.answer, len(p.metadata["choices"])) == ("J", 10) and "J) j" in p.prompt


def test_code_and_solution_layouts(tmp_path):
    bcb = write_jsonl(tmp_path / "bcb.jsonl", [{"task_id": "BigCodeBench/0", "complete_prompt": "def task_func():\n",
                                               "test": "import unittest\nclass TestCases(unittest.TestCase): pass",
                                               "entry_point": "task_func", "libs": "[]"}])
    (p,) = load(f"bigcodebench-hard:{bcb}")
    assert (p.id, p.domain, p.entry_point, p.metadata["test_style"]) == ("bigcodebench-hard:BigCodeBench/0", "code", "task_func", "unittest")
    sol = write_jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "solution": "Clearly $\\boxed{2}$.", "level": "Level 1"}])
    (p,) = load(str(sol))
    assert (p.answer, p.metadata["level"]) == ("2", "Level 1")


def test_every_known_dataset_names_a_real_layout_and_source():
    assert {"embedded-math", "humaneval", "math", "math-500", "gsm8k", "aime24", "aime25", "gpqa-diamond", "mmlu-redux",
            "supergpqa", "bigcodebench", "bigcodebench-hard", "mt-aime24", "mt-math100", "m-imo"} <= set(KNOWN)
    for spec in KNOWN.values():
        assert spec.layout in LAYOUTS and (spec.local or spec.hub_id)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}])
    with pytest.raises(Rosa2Error) as err:
        load(f"math-500:{path}")
    assert str(path) in str(err.value) and "line 2" in str(err.value) and "'answer'" in str(err.value)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "q", "answer": "no hashes"}], "no '#### N'"),
        (["not an object"], "expected a JSON object"),
    ],
)
def test_malformed_rows_are_refused_with_their_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(Rosa2Error, match=re.escape(message)) as err:
        load(f"gsm8k:{path}")
    assert "line 1" in str(err.value)


def test_bad_json_duplicate_ids_and_unknown_layouts(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"problem": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(Rosa2Error, match="line 2: not valid JSON"):
        load(str(tmp_path / "bad.jsonl"))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "problem": "a", "answer": "1"}, {"id": 1, "problem": "b", "answer": "2"}])
    with pytest.raises(Rosa2Error, match="repeats"):
        load(str(dup))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(Rosa2Error, match="cannot tell the layout.*gsm8k"):
        load(str(odd))


def test_unknown_names_and_missing_files_are_clear():
    with pytest.raises(Rosa2Error, match="unknown dataset 'mathh'.*math-500.*humaneval"):
        load("mathh")
    with pytest.raises(Rosa2Error, match="'nope' in 'nope:x.jsonl' is neither"):
        load("nope:x.jsonl")
    with pytest.raises(Rosa2Error, match="does not exist"):
        load("/no/such/file.jsonl")
    with pytest.raises(Rosa2Error, match="does not exist"):
        load("math-500:/no/such/file.jsonl")


def test_hub_failure_is_one_clear_error():
    # the hub is unreachable here; offline mode makes `datasets` fail at once instead of retrying
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "rosa2.cli", "datasets", "--show", "math-500"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "could not load 'HuggingFaceH4/MATH-500'" in run.stderr and "--dataset NAME:PATH" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_lists_and_shows(capsys):
    assert main(["datasets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in KNOWN) and "HuggingFaceH4/MATH-500" in listing
    assert main(["datasets", "--show", "humaneval", "--limit", "2"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("=== humaneval:HumanEval/") == 2 and "2 problem(s), fingerprint" in shown
    assert main(["datasets", "--show", "embedded-math", "--limit", "3", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["domain"] == "math"
    assert main(["datasets", "--show", "nonexistent"]) == 2
    assert "unknown dataset 'nonexistent'" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, suffix):
    """17.5: Latin-1 bytes on line 3 are one error naming the file and line, not a UnicodeDecodeError."""
    import gzip

    good = b'{"question": "What is 1+1?", "answer": "2"}\n'
    body = good + good.replace(b"1+1", b"2+2").replace(b'"2"', b'"4"') + '{"question": "caf\u00e9 1+2?", "answer": "3"}\n'.encode("latin-1")
    path = tmp_path / f"latin{suffix}"
    path.write_bytes(gzip.compress(body) if suffix.endswith(".gz") else body)
    with pytest.raises(Rosa2Error, match=rf"{re.escape(str(path))}: line 3: not UTF-8 \(byte 0xe9") as info:
        load(f"math-500:{path}")
    assert "\n" not in str(info.value)
    # through the CLI: one line, no traceback
    out = subprocess.run([sys.executable, "-m", "rosa2", "datasets", "--show", f"math-500:{path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and f"{path}: line 3: not UTF-8" in out.stderr
    # a BOM at the start is UTF-8 all the same
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good)
    assert load(f"math-500:{bom}")[0].answer == "2"


def test_torn_gzip_and_parquet_are_named(tmp_path):
    gz = tmp_path / "torn.jsonl.gz"
    gz.write_bytes(b"not gzip at all\n")
    with pytest.raises(Rosa2Error, match=rf"{re.escape(str(gz))}: line 1: not a readable gzip file"):
        load(f"math-500:{gz}")
    pq = tmp_path / "torn.parquet"
    pq.write_bytes(b"PAR1 and nothing else")
    with pytest.raises(Rosa2Error, match=rf"{re.escape(str(pq))}: not a readable parquet file"):
        load(f"math-500:{pq}")


def test_a_blank_question_or_answer_in_a_row_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "  ", "answer": "3"}])
    with pytest.raises(Rosa2Error, match=r"blank.jsonl: line 2: field 'question' is empty"):
        load(f"math-500:{path}")
    path = write_jsonl(tmp_path / "blank2.jsonl", [{"question": "1+1?", "answer": ""}])
    with pytest.raises(Rosa2Error, match=r"blank2.jsonl: line 1: field 'answer' is empty"):
        load(f"math-500:{path}")
