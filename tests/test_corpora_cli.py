"""`genret inspect`: the JSON summary printed through the real CLI entry point."""

from __future__ import annotations

import json

from genret_jax import cli


def _inspect(capsys, *argv: str) -> tuple[int, dict | None, str]:
  rc = cli.main(["inspect", *argv])
  out, err = capsys.readouterr()
  return rc, (json.loads(out) if rc == 0 else None), err


def test_inspect_cranfield(capsys, cranfield_dir):
  rc, summary, _ = _inspect(capsys, str(cranfield_dir))
  assert rc == 0
  assert summary["documents"] == 1400
  assert summary["queries"] == 225
  assert summary["qrels"] == 1837
  assert summary["queries_per_split"] == {"test": 225}
  assert summary["judged_queries"] == 225 and summary["unjudged_queries"] == 0
  assert summary["empty_documents"] == 2
  assert sum(summary["qrels_per_grade"].values()) == 1837
  assert set(summary["qrels_per_grade"]) == {"0", "1", "2", "3", "4"}
  tokens = summary["tokens"]
  assert tokens["total"] == tokens["title_total"] + tokens["text_total"]
  assert tokens["mean_per_doc"] == round(tokens["total"] / 1400, 2)


def test_inspect_scifact_with_format(capsys, scifact_dir):
  rc, summary, _ = _inspect(capsys, str(scifact_dir), "--format", "beir", "--indent", "0")
  assert rc == 0
  assert summary["documents"] == 5183
  assert summary["queries_per_split"] == {"test": 300, "train": 809}
  assert summary["judged_queries_per_split"] == {"test": 300, "train": 809}


def test_inspect_questions_and_max_docs(capsys, tmp_path):
  psgs = tmp_path / "psgs.tsv"
  psgs.write_text("id\ttext\ttitle\n1\tone two\tA\n2\tthree\tB\n3\t\t\n", encoding="utf-8")
  qa = tmp_path / "nq.qa.csv"
  qa.write_text("what\t['x']\n", encoding="utf-8")
  rc, summary, _ = _inspect(capsys, str(psgs), "--questions", str(qa), "--max-docs", "2")
  assert rc == 0
  assert summary["documents"] == 2 and summary["report"]["documents_beyond_max_docs"] == 1
  assert summary["queries"] == 1 and summary["queries_with_answers"] == 1 and summary["unjudged_queries"] == 1


def test_inspect_counts_empty_documents(capsys, tmp_path):
  psgs = tmp_path / "psgs.tsv"
  psgs.write_text("id\ttext\ttitle\n1\tone two\tA\n2\t\t\n", encoding="utf-8")
  rc, summary, _ = _inspect(capsys, str(psgs))
  assert rc == 0 and summary["documents"] == 2 and summary["empty_documents"] == 1


def test_inspect_bad_input_is_one_line_error(capsys, tmp_path):
  bad = tmp_path / "c.jsonl"
  bad.write_text('{"id": "1", "text": "a"}\n{"id": "1", "text": "b"}\n', encoding="utf-8")
  rc, _, err = _inspect(capsys, str(bad))
  assert rc == 2
  assert err.strip().count("\n") == 0
  assert f"{bad}:2: duplicate document id" in err
