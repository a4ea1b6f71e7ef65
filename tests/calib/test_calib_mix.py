"""calib/mix.py: the interleaving rule, every text kept once, the tail last, clear CLI errors."""
from __future__ import annotations

import json

import pytest

from calib.mix import interleave_texts, main


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def test_ratio_09_adds_one_after_each_first_text_but_every_tenth():
    first = [f"g{i}" for i in range(20)]
    second = [f"p{i}" for i in range(30)]
    mixed = interleave_texts(first, second, 0.9, keep_tail=5)
    after = {g: mixed[mixed.index(g) + 1] for g in first[:-1]}
    skipped = [g for g in first[:-1] if after[g].startswith("g")]
    assert skipped == ["g9"]                      # g19 is last of first; g9 is the tenth
    assert mixed[:4] == ["g0", "p0", "g1", "p1"]
    assert mixed[-5:] == second[-5:]              # the tail stays last
    assert sorted(mixed) == sorted(first + second)    # each text exactly once


def test_second_running_out_leaves_first_texts_in_order_then_tail():
    mixed = interleave_texts(["a", "b", "c", "d"], ["x", "y", "t"], 1.0, keep_tail=1)
    assert mixed == ["a", "x", "b", "y", "c", "d", "t"]


def test_ratio_above_one_and_zero():
    assert interleave_texts(["a", "b"], ["1", "2", "3", "4", "5"], 2.0, 0) == ["a", "1", "2", "b", "3", "4", "5"]
    assert interleave_texts(["a", "b"], ["1", "2"], 0.0, 0) == ["a", "b", "1", "2"]


@pytest.mark.parametrize("ratio, tail, field", [(float("nan"), 0, "--ratio"), (-1.0, 0, "--ratio"),
                                                (1.0, 9, "--keep_tail"), (1.0, -1, "--keep_tail")])
def test_bad_values_name_the_field(ratio, tail, field):
    with pytest.raises(ValueError, match=field):
        interleave_texts(["a"], ["b", "c"], ratio, tail)


def test_cli_writes_the_mix_and_refuses_bad_input(tmp_path, capsys):
    _write(tmp_path / "g.jsonl", ["gen one", "gen two"])
    _write(tmp_path / "p.jsonl", ["prose one", "prose two", "held out"])
    out = tmp_path / "mix.jsonl"
    main(["--first", str(tmp_path / "g.jsonl"), "--second", str(tmp_path / "p.jsonl"), "--keep_tail", "1",
          "--output", str(out)])
    rows = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == ["gen one", "prose one", "gen two", "prose two", "held out"]
    with pytest.raises(SystemExit) as exc:
        main(["--first", str(tmp_path / "g.jsonl"), "--second", str(tmp_path / "p.jsonl"), "--ratio", "nan",
              "--output", str(out)])
    assert exc.value.code == 2 and "--ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--first", str(tmp_path / "missing.jsonl"), "--second", str(tmp_path / "p.jsonl"),
              "--output", str(out)])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--first", str(tmp_path / "g.jsonl"), "--second", str(tmp_path / "p.jsonl"), "--output", str(tmp_path)])
    assert exc.value.code == 2 and "directory" in capsys.readouterr().err
