"""``vinterp steer train | eval | show`` on tiny-llama (HF backend: fast), resuming an
interrupted sweep, and bad input (clear error, nothing half-written)."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from vinterp.cli import main
from vinterp.steering.datasets import ab_questions, neutral_prompts, sentiment_pairs

MODEL = "tiny-llama"      # 2 layers, hidden size 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("steer")
    pos, neg = sentiment_pairs()
    (d / "pos.txt").write_text("\n".join(pos[:6]) + "\n")
    (d / "neg.txt").write_text("\n".join(neg[:6]) + "\n")
    (d / "prompts.txt").write_text("\n".join(neutral_prompts()[:3]) + "\n")
    (d / "ab.jsonl").write_text("".join(json.dumps(q) + "\n" for q in ab_questions()[:2]))
    (d / "empty.txt").write_text("\n\n")
    return d


@pytest.fixture(scope="module")
def vector(files):
    out = files / "vec.safetensors"
    assert main(["steer", "train", "--model", MODEL, "--backend", "hf", "--pos",
                 str(files / "pos.txt"), "--neg", str(files / "neg.txt"), "--layers", "0:2",
                 "-o", str(out)]) == 0
    return out


def _eval_args(files, vector, out, *more):
    return ["steer", "eval", "--vector", str(vector), "--backend", "hf", "--layers", "0:2",
            "--scales", "-4:4:3", "--prompts", str(files / "prompts.txt"), "--ab",
            str(files / "ab.jsonl"), "--max-tokens", "4", "-q", "-o", str(out), *more]


def test_train_eval_show_round_trip(files, vector, tmp_path, capsys):
    from vinterp.steering import SteeringVector

    vec = SteeringVector.load(vector)
    assert vec.layers == [0, 1] and vec.hidden_size == 64 and vec.model == MODEL
    assert vec.method == "mean_diff" and vec.extra["n_positive"] == 6
    out = tmp_path / "sweep"
    assert main(_eval_args(files, vector, out)) == 0
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["L00_S+0.0.jsonl", "L00_S+4.0.jsonl", "L00_S-4.0.jsonl",
                     "L01_S+0.0.jsonl", "L01_S+4.0.jsonl", "L01_S-4.0.jsonl"]
    rows = [json.loads(x) for x in (out / "cells" / "L01_S+4.0.jsonl").read_text()
            .splitlines()]
    assert [r["type"] for r in rows] == ["ab", "ab"] + ["generation"] * 3 + ["summary"]
    assert all(len(r["tokens"]) <= 4 for r in rows if r["type"] == "generation")
    summary = rows[-1]
    for m in ("ab", "behavior", "fluency"):
        s = summary[m]
        assert s["lo"] <= s["mean"] <= s["hi"] and s["n"] == (2 if m == "ab" else 3)
    for name in ("summary.csv", "summary.md", "heatmap_ab.png", "heatmap_behavior.png",
                 "heatmap_fluency.png", "sweep.json"):
        assert (out / name).stat().st_size > 0
    assert len((out / "summary.csv").read_text().splitlines()) == 7
    # scale 0 is the unsteered model at every layer
    zero = [json.loads((out / "cells" / f"L0{i}_S+0.0.jsonl").read_text().splitlines()[-1])
            for i in (0, 1)]
    assert zero[0]["fluency"]["mean"] == pytest.approx(zero[1]["fluency"]["mean"], rel=1e-5)
    capsys.readouterr()
    assert main(["steer", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "6 cells (2 layers x 3 scales)" in shown
    assert "best cell per metric:" in shown and "Pareto front" in shown
    for m in ("ab", "behavior", "fluency"):
        assert f"  {m} " in shown


def _cells(out):
    return {p.name: [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((out / "cells").iterdir())}


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for ra, rb in zip(a[name], b[name], strict=True):
            assert ra.keys() == rb.keys()
            for k, va in ra.items():
                vb = rb[k]
                if isinstance(va, float):
                    assert math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-4), (name, k)
                elif isinstance(va, dict):
                    for kk in va:
                        x, y = va[kk], vb[kk]
                        assert (x is None and y is None) or math.isclose(
                            x, y, rel_tol=1e-4, abs_tol=1e-4), (name, k, kk)
                else:
                    assert va == vb, (name, k)


def test_resume_after_interruption_equals_one_run(files, vector, tmp_path, monkeypatch):
    sweep_mod = importlib.import_module("vinterp.evals.sweep")

    whole = tmp_path / "whole"
    assert main(_eval_args(files, vector, whole)) == 0
    part = tmp_path / "part"
    finish, calls = sweep_mod._Batch.finish, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return finish(self)

    monkeypatch.setattr(sweep_mod._Batch, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(_eval_args(files, vector, part, "--batch-cells", "2"))
    monkeypatch.setattr(sweep_mod._Batch, "finish", finish)
    assert len(list((part / "cells").iterdir())) == 4        # two whole batches, no partial
    assert not list(part.rglob(".*tmp*"))
    assert not (part / "summary.csv").exists()
    ran, write = [], sweep_mod._write_cells

    def recording(out, cells, metrics):
        ran.extend(c[:2] for c in cells)
        write(out, cells, metrics)

    monkeypatch.setattr(sweep_mod, "_write_cells", recording)
    assert main(_eval_args(files, vector, part, "--batch-cells", "2")) == 0
    assert sorted(ran) == [(1, 0.0), (1, 4.0)]                 # only the missing cells ran
    _same(_cells(part), _cells(whole))
    # (HF pads a batch to its longest prompt: other batches, last-digit float differences)
    csv = [[r.split(",") for r in (d / "summary.csv").read_text().splitlines()]
           for d in (part, whole)]
    assert csv[0][0] == csv[1][0] and len(csv[0]) == len(csv[1]) == 7
    for ra, rb in zip(csv[0][1:], csv[1][1:], strict=True):
        assert [float(x) for x in ra] == pytest.approx([float(x) for x in rb], abs=2e-4)


def test_a_different_sweep_in_the_same_directory_is_refused(files, vector, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_eval_args(files, vector, out, "--metrics", "ab")) == 0
    before = sorted(p.name for p in out.rglob("*"))
    cell = (out / "cells" / "L00_S+4.0.jsonl").stat().st_mtime_ns
    assert main(_eval_args(files, vector, out, "--metrics", "ab")) == 0    # all skipped
    assert (out / "cells" / "L00_S+4.0.jsonl").stat().st_mtime_ns == cell
    capsys.readouterr()
    assert main(_eval_args(files, vector, out, "--metrics", "fluency")) == 2
    assert "holds a different sweep (its metrics" in capsys.readouterr().err
    assert main(_eval_args(files, vector, out, "--metrics", "ab", "--max-tokens", "5")) == 2
    assert sorted(p.name for p in out.rglob("*")) == before


def test_bad_input_errors_and_writes_nothing(files, vector, tmp_path, capsys):
    from vinterp.steering import SteeringVector

    wrong = tmp_path / "wrong.safetensors"
    SteeringVector({0: [1.0] * 32}).save(wrong)               # hidden 32, model has 64
    def ev(vec, out, **swap):
        args = _eval_args(files, vec, out)
        for opt, value in swap.items():
            args[args.index("--" + opt) + 1] = value
        return args

    cases = [
        (ev(wrong, tmp_path / "o1") + ["--model", MODEL],
         "hidden size 32 but the model's is 64", tmp_path / "o1"),
        (ev(vector, tmp_path / "o2", layers="0:5"),
         "layer(s) [2, 3, 4] out of range: the model has 2 layers", tmp_path / "o2"),
        (ev(vector, tmp_path / "o3", prompts=str(files / "empty.txt")),
         "holds no prompts (empty file)", tmp_path / "o3"),
        (ev(vector, tmp_path / "o4", ab=str(files / "empty.txt")),
         "holds no A/B questions (empty file)", tmp_path / "o4"),
        (["steer", "train", "--model", MODEL, "--backend", "hf", "--pos",
          str(files / "empty.txt"), "--neg", str(files / "neg.txt"), "-o",
          str(tmp_path / "v.safetensors")], "holds no prompts", tmp_path / "v.safetensors"),
        (["steer", "train", "--model", MODEL, "--backend", "hf", "--layers", "1:4", "-o",
          str(tmp_path / "v2.safetensors")], "out of range: the model has 2 layers",
         tmp_path / "v2.safetensors"),
        (["steer", "show", str(tmp_path / "nowhere")], "not a sweep output directory", None),
    ]
    for argv, message, path in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert "vinterp steer: error: " in err
        if path is not None:
            assert not path.exists(), path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.safetensors"]


def test_a_server_that_cannot_be_reached_is_one_error_line(files, vector, tmp_path, capsys):
    """``--server URL`` with the server down: the CLI's one error line and exit code 2, not
    the remote backend's RemoteError as a traceback (train and eval given --model skip the
    /health check)."""
    down = "http://127.0.0.1:1"     # nothing listens on port 1
    runs = [["steer", "train", "--server", down, "--pos", str(files / "pos.txt"), "--neg",
             str(files / "neg.txt"), "--layers", "0:2", "--model", MODEL, "-o",
             str(tmp_path / "v.safetensors")],
            _eval_args(files, vector, tmp_path / "sweep", "--server", down, "--model", MODEL)]
    for argv in runs:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"vinterp steer: error: cannot reach the vinterp server at {down}: "
                       f"[Errno 111] Connection refused"], err
    assert not (tmp_path / "v.safetensors").exists()


def test_train_with_server_uses_the_served_model(files, tmp_path, monkeypatch, capsys):
    """``steer train --server URL`` without --model asks the server which model it serves
    (its tokenizer and config build the remote model, its name labels the vector); it used
    smollm2-135m, --model's parser default (audit finding 4)."""
    from vinterp import cli

    sweep_mod = importlib.import_module("vinterp.evals.sweep")
    asked, built = [], []
    monkeypatch.setattr(sweep_mod, "server_model", lambda url, key=None: asked.append(url)
                        or MODEL)

    def remote_lm(name, url, key=None):
        built.append(name)
        raise ValueError("stop here: no server in this test")

    monkeypatch.setattr(sweep_mod, "remote_language_model", remote_lm)
    url = "http://127.0.0.1:1"
    argv = ["steer", "train", "--server", url, "--pos", str(files / "pos.txt"), "--neg",
            str(files / "neg.txt"), "-o", str(tmp_path / "v.safetensors")]
    assert main(argv) == 2
    assert asked == [url] and built == [MODEL]
    # the resolution itself: --model wins; no --server and no --model is smollm2-135m
    args = cli.build_parser().parse_args(argv)
    assert args.model is None and cli._train_model_name(args) == MODEL
    args = cli.build_parser().parse_args([*argv, "--model", "tiny-gpt2"])
    assert cli._train_model_name(args) == "tiny-gpt2" and asked == [url, url]
    args = cli.build_parser().parse_args(["steer", "train", "-o", "v.safetensors"])
    assert cli._train_model_name(args) == "smollm2-135m"


def test_train_with_server_down_and_no_model_is_one_error_line(files, tmp_path, capsys):
    down = "http://127.0.0.1:1"     # nothing listens on port 1
    assert main(["steer", "train", "--server", down, "--pos", str(files / "pos.txt"), "--neg",
                 str(files / "neg.txt"), "-o", str(tmp_path / "v.safetensors")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vinterp steer: error: cannot reach the vinterp server at {down}: "
        "[Errno 111] Connection refused"]
    assert not (tmp_path / "v.safetensors").exists()
