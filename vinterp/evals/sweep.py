"""Steering sweeps: a layer x scale grid of a steering vector, measured over many prompts.

Every cell (layer, scale) is measured on three metrics, each with a 95% confidence interval
over prompts:

* ``ab``: CAA-style effect on A/B questions, steered: the log-probability of the matching
  answer minus that of the non-matching one. ``ab_mode="text"`` (default) scores the answers'
  own text after the question stem (``"{stem}\\n{answer}"``, mean log-probability per answer
  token, teacher-forced next-token predictions); ``ab_mode="letter"`` scores the next token
  ``A`` vs ``B`` after ``"{question}\\nAnswer: ("``, CAA's original form. Small models do not
  bind a letter to its answer (smollm2-135m: matching - non-matching letter 0.05, 95% CI
  +-0.86, unsteered, and no steering moves it), so ``letter`` suits larger models only;
* ``behavior``: the steered text (``max_tokens`` greedy tokens from each neutral prompt),
  labelled by the same model unsteered: log P(" positive") - log P(" negative");
* ``fluency``: mean token NLL of the steered continuation under the unsteered model (lower
  is more fluent).

Batching: the grid is not looped cell by cell. A batch of cells (by default the whole grid)
is one ``generate`` trace with one invoke per (cell, prompt) (and per (cell, question) for
``letter``), each with its own steering op, so the engine runs them together; ``text`` A/B
scoring is one ``trace`` with an invoke per (cell, question, answer), each steered; the
unsteered scoring of every generated text is one more trace. Against a server
(``target="http://..."``) the same traces run as remote traces, every batch submitted at once
(non-blocking), so the server batches them all. Results are identical either way (same
graphs, same engine).

Output directory: ``cells/L{layer}_S{scale}.jsonl`` (a row per question/prompt, then a
``summary`` row), ``summary.csv``, ``summary.md``, ``heatmap_<metric>.png``, ``sweep.json``
(the settings). Each file is written whole (temporary file, then rename), so an interrupted
sweep leaves only complete cells; running it again skips them.

Example::

    model = LanguageModel("smollm2-135m", backend="vllm")
    sweep(model, SteeringVector.load("happy.safetensors"), layers=[6, 8, 10],
          scales=[-8, 0, 8], prompts=neutral_prompts()[:20], max_tokens=24,
          out_dir="happy-sweep")
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vinterp.evals.progress import Progress
from vinterp.evals.results import (
    METRICS, cell_name, finished_cell, mean_ci, summarize, write_atomic, write_reports,
)
from vinterp.steering.datasets import ab_answers
from vinterp.steering.kernels import position_mask
from vinterp.steering.datasets import ab_questions as builtin_ab_questions
from vinterp.steering.datasets import neutral_prompts
from vinterp.steering.vectors import SteeringVector

LABEL_TEMPLATE = ("Text: {text}\nIs the sentiment of this text positive or negative? "
                  "Answer:")
AB_SUFFIX = "\nAnswer: ("
AB_MODES = ("text", "letter")
SETTINGS_FILE = "sweep.json"


class SweepError(ValueError):
    """Bad sweep input (raised before anything is written)."""


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def vector_hash(vector: SteeringVector) -> str:
    """A hash of the vector's tensors (not its metadata)."""
    h = hashlib.sha256()
    for k, v in vector.vectors.items():
        h.update(str(k).encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- targets
def remote_language_model(name: str, url: str, api_key: str | None = None) -> Any:
    """A ``LanguageModel`` without weights whose traces all run on the server at ``url``."""
    from vinterp.language_model import LanguageModel

    return LanguageModel(name, backend="remote", host=url, api_key=api_key)


def server_model(url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The model a vinterp server serves (its ``/health``)."""
    import httpx

    base = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
    try:
        r = httpx.get(f"{base}/health", timeout=timeout)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise SweepError(f"cannot reach the vinterp server at {base}: {exc}") from None
    return str(r.json()["model"])


@dataclass
class _Target:
    lm: Any
    trace_kw: dict[str, Any]
    remote: bool
    label: str


def _target(target: Any, model: str | None, api_key: str | None) -> _Target:
    if isinstance(target, str):
        name = model or server_model(target, api_key)
        lm = remote_language_model(name, target, api_key)
        kw: dict[str, Any] = {"remote": target}
        if api_key is not None:
            kw["api_key"] = api_key
        return _Target(lm, kw, True, f"server {target} ({name})")
    if not hasattr(target, "trace") or not hasattr(target, "config"):
        raise SweepError(f"target must be a LanguageModel or a server URL, got "
                         f"{type(target).__name__}")
    return _Target(target, {}, False,
                   f"{Path(str(target.path)).name} ({target.backend_name} backend)")


# --------------------------------------------------------------------------- the sweep
@dataclass
class _Plan:
    prompts: list[str]
    prompt_ids: list[list[int]]
    questions: list[dict[str, Any]]
    question_ids: list[list[int]]
    ab_tokens: tuple[int, int]              # ids of "A", "B"
    ab_mode: str
    ab_texts: list[tuple[list[int], list[int], list[int]]]  # text: stem, matching, other
    label_tokens: tuple[int, int]           # ids of " positive", " negative"
    eos: set[int]


def _first_token(tok: Any, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise SweepError(f"the tokenizer gives no token for {text!r}")
    return int(ids[0])


def _plan(lm: Any, prompts: list[str], questions: list[dict[str, Any]],
          labels: tuple[str, str], ab_mode: str = "text") -> _Plan:
    tok = lm.tokenizer
    texts = []
    if ab_mode == "text":
        for q in questions:
            try:
                stem, yes, no = ab_answers(q)
            except ValueError as exc:
                raise SweepError(str(exc)) from None
            texts.append((list(tok(stem + "\n")["input_ids"]),
                          list(tok(yes, add_special_tokens=False)["input_ids"]),
                          list(tok(no, add_special_tokens=False)["input_ids"])))
    ab = (_first_token(tok, "A"), _first_token(tok, "B"))
    lab = (_first_token(tok, labels[0]), _first_token(tok, labels[1]))
    if ab[0] == ab[1] or lab[0] == lab[1]:
        raise SweepError("the answer/label tokens must differ")
    eos = {int(t) for t in [tok.eos_token_id, getattr(tok, "pad_token_id", None)]
           if t is not None}
    return _Plan(prompts, [list(tok(p)["input_ids"]) for p in prompts], questions,
                 [list(tok(q["question"] + AB_SUFFIX)["input_ids"]) for q in questions]
                 if ab_mode == "letter" else [], ab, ab_mode, texts, lab, eos)


def _steered(lm: Any, plan: _Plan, cells: list[tuple[int, float]], vector: SteeringVector,
             max_tokens: int, positions: Any, want_gen: bool, want_ab: bool,
             trace_kw: dict[str, Any]) -> tuple[Any, list[Any], list[Any]]:
    """One generate trace for ``cells``: steered generations and (``letter``) A/B logprob
    differences; ``(None, [], [])`` when there is nothing to generate."""
    gen_slots: list[tuple[int, int, int]] = []     # (cell, prompt, invoke index)
    ab_saves: list[tuple[int, int, Any]] = []      # (cell, question, saved proxy)
    k = 0
    want_ab = want_ab and plan.ab_mode == "letter"
    if not (want_gen and plan.prompt_ids) and not (want_ab and plan.question_ids):
        return None, gen_slots, ab_saves
    with lm.generate(max_new_tokens=max_tokens, do_sample=False, **trace_kw) as tracer:
        for ci, (layer, scale) in enumerate(cells):
            vec = vector[layer]
            if want_gen:
                for pi, ids in enumerate(plan.prompt_ids):
                    with tracer.invoke([ids]):
                        with tracer.all():
                            lm.layers[layer].output.steer(vec, scale=float(scale),
                                                          positions=positions)
                    gen_slots.append((ci, pi, k))
                    k += 1
            if want_ab:
                a, b = plan.ab_tokens
                for qi, (ids, q) in enumerate(zip(plan.question_ids, plan.questions,
                                                  strict=True)):
                    with tracer.invoke([ids], max_new_tokens=1):
                        lm.layers[layer].output.steer(vec, scale=float(scale),
                                                      positions=positions)
                        lp = lm.logits[0, -1].log_softmax(-1)
                        m, n = (a, b) if q["matching"] == "A" else (b, a)
                        ab_saves.append((ci, qi, (lp[m] - lp[n]).save()))
                    k += 1
    return tracer, gen_slots, ab_saves


def _ab_text(lm: Any, plan: _Plan, cells: list[tuple[int, float]], vector: SteeringVector,
             positions: Any, trace_kw: dict[str, Any]) -> tuple[Any, list[Any]]:
    """One trace scoring each question's two answer texts in every cell, steered: the mean
    log-probability per answer token of the matching answer and of the other one."""
    saves: list[tuple[int, int, Any, Any]] = []   # (cell, question, matching, other)
    if not plan.ab_texts:
        return None, saves
    with lm.trace(**trace_kw) as tracer:
        for ci, (layer, scale) in enumerate(cells):
            vec = vector[layer]
            for qi, (stem, yes, no) in enumerate(plan.ab_texts):
                pair = []
                for ans in (yes, no):
                    with tracer.invoke([stem + ans]):
                        lm.layers[layer].output.steer(
                            vec, scale=float(scale),
                            positions=_text_positions(positions, len(stem), len(ans)))
                        lp = lm.logits[0, len(stem) - 1:-1].log_softmax(-1)
                        tgt = torch.tensor(ans, dtype=torch.long)[:, None]
                        pair.append(lp.gather(-1, tgt).mean().save())
                saves.append((ci, qi, pair[0], pair[1]))
    return tracer, saves


def _text_positions(positions: Any, stem: int, answer: int) -> Any:
    """``positions`` for scoring an answer text after its question as one prompt, read as in
    generation: the question is the prompt and the answer its generated tokens (``-1`` is the
    question's last token, ``"generated"`` the answer's tokens). Passed as they are, they
    would count from the answer's end: ``-1`` then steered only the last answer token, whose
    effect the score never sees."""
    if positions is None or positions == "all":
        return positions
    keep = position_mask(positions, torch.arange(stem + answer), stem)
    return [i for i, k in enumerate(keep.tolist()) if k]


def _positions_setting(positions: Any) -> Any:
    """``positions`` checked up front (a bad one would otherwise fail inside the first
    batch's trace), as JSON for the sweep file's settings, which tell a resumed sweep's cells
    from another's: a slice as ``{"slice": [start, stop, step]}``, the graph's form."""
    accepted = ("None, 'all', 'prompt', 'generated', an int, a list of ints or a slice of "
                "ints such as slice(0, 4)")
    try:
        position_mask(positions, torch.arange(1), 1)   # the kernels' own check
        if isinstance(positions, slice):
            bounds = [positions.start, positions.stop, positions.step]
            if not all(b is None or (isinstance(b, int) and not isinstance(b, bool))
                       for b in bounds):
                raise ValueError(f"slice bounds must be ints or None, got {positions!r}")
            return {"slice": bounds}
        if isinstance(positions, (list, tuple)):
            if not positions or not all(isinstance(p, int) and not isinstance(p, bool)
                                        for p in positions):
                raise ValueError(f"a positions list needs one int or more, got {positions!r}")
            return list(positions)
        if positions is None or isinstance(positions, (str, int)):
            return positions
        raise ValueError(f"got {type(positions).__name__} {positions!r}")
    except (ValueError, TypeError) as exc:
        raise SweepError(f"bad positions {positions!r} ({exc}); use {accepted}") from None


def _generated(plan: _Plan, prompt_ids: list[int], ids: Any) -> list[int]:
    out = []
    for t in [int(x) for x in list(ids)[len(prompt_ids):]]:
        if t in plan.eos:
            break
        out.append(t)
    return out


def _scoring(lm: Any, plan: _Plan, gens: list[dict[str, Any]], want_beh: bool,
             want_flu: bool, trace_kw: dict[str, Any]) -> tuple[Any, list[Any]]:
    """One unsteered trace scoring every generation: fluency NLL and behaviour label."""
    tok = lm.tokenizer
    slots: list[Any] = []
    if not gens or not (want_beh or want_flu):
        return None, slots
    with lm.trace(**trace_kw) as tracer:
        for g in gens:
            slot: dict[str, Any] = {}
            p_ids, gen = g["prompt_ids"], g["tokens"]
            if want_flu and gen:
                with tracer.invoke([p_ids + gen]):
                    lp = lm.logits[0, len(p_ids) - 1:-1].log_softmax(-1)
                    tgt = torch.tensor(gen, dtype=torch.long)[:, None]
                    slot["fluency"] = (-lp.gather(-1, tgt)).mean().save()
            if want_beh:
                text = g["prompt"] + g["text"]
                ids = list(tok(LABEL_TEMPLATE.format(text=text))["input_ids"])
                with tracer.invoke([ids]):
                    lp = lm.logits[0, -1].log_softmax(-1)
                    pos, neg = plan.label_tokens
                    slot["behavior"] = (lp[pos] - lp[neg]).save()
            slots.append(slot)
    return tracer, slots


class _Batch:
    """One batch of cells through both traces (local: at once; remote: non-blocking)."""

    def __init__(self, sw: _Sweep, cells: list[tuple[int, float]]) -> None:
        self.sw, self.cells = sw, cells
        self.tracer, self.gen_slots, self.ab_saves = _steered(
            sw.lm, sw.plan, cells, sw.vector, sw.max_tokens, sw.positions, sw.want_gen,
            sw.want_ab, sw.trace_kw)
        self.ab_tracer, self.ab_text = (None, []) if not sw.want_ab else _ab_text(
            sw.lm, sw.plan, cells, sw.vector, sw.positions, sw.trace_kw)
        self.scorer = None

    def score(self) -> None:
        if self.sw.remote and self.tracer is not None and self.tracer.handle is not None:
            self.tracer.wait()
        plan = self.sw.plan
        result = (self.tracer.result if self.tracer is not None else None) or []
        self.gens: list[dict[str, Any]] = []
        for ci, pi, k in self.gen_slots:
            gen = _generated(plan, plan.prompt_ids[pi], result[k])
            self.gens.append({"cell": ci, "index": pi, "prompt": plan.prompts[pi],
                              "prompt_ids": plan.prompt_ids[pi], "tokens": gen,
                              "text": self.sw.lm.tokenizer.decode(gen,
                                                                  skip_special_tokens=True)})
        self.scorer, self.slots = _scoring(self.sw.lm, plan, self.gens, self.sw.want_beh,
                                           self.sw.want_flu, self.sw.trace_kw)

    def finish(self) -> list[tuple[int, float, list[dict[str, Any]]]]:
        if self.sw.remote and self.scorer is not None and self.scorer.handle is not None:
            self.scorer.wait()
        if self.sw.remote and self.ab_tracer is not None and self.ab_tracer.handle is not None:
            self.ab_tracer.wait()
        rows: list[list[dict[str, Any]]] = [[] for _ in self.cells]
        for ci, qi, val in self.ab_saves:
            rows[ci].append({"type": "ab", "index": qi, "matching":
                             self.sw.plan.questions[qi]["matching"],
                             "ab": float(torch.as_tensor(val))})
        for ci, qi, yes, no in self.ab_text:
            y, n = float(torch.as_tensor(yes)), float(torch.as_tensor(no))
            rows[ci].append({"type": "ab", "index": qi, "matching":
                             self.sw.plan.questions[qi]["matching"], "ab": y - n,
                             "logprob_matching": y, "logprob_other": n})
        for g, slot in zip(self.gens, self.slots or [{}] * len(self.gens), strict=True):
            row = {"type": "generation", "index": g["index"], "prompt": g["prompt"],
                   "text": g["text"], "tokens": g["tokens"]}
            for m in ("behavior", "fluency"):
                if m in self.sw.metrics:
                    row[m] = float(torch.as_tensor(slot[m])) if m in slot else None
            rows[g["cell"]].append(row)
        return [(layer, scale, r) for (layer, scale), r in zip(self.cells, rows, strict=True)]


class _Sweep:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _parse_metrics(metrics: Iterable[str] | str) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m]
    out = [str(m).strip() for m in metrics]
    bad = [m for m in out if m not in METRICS]
    if bad or not out:
        raise SweepError(f"unknown metric(s) {bad}; choose from {list(METRICS)}")
    return [m for m in METRICS if m in out]


def sweep(target: Any, vector: SteeringVector | str | os.PathLike[str],
          layers: Iterable[int] | None = None, scales: Iterable[float] = (-8, -4, 0, 4, 8),
          prompts: Sequence[str] | None = None, max_tokens: int = 32,
          metrics: Iterable[str] | str = METRICS, out_dir: str | os.PathLike[str] = "sweep",
          *, ab_questions: Sequence[dict[str, Any]] | None = None, positions: Any = "all",
          ab_mode: str = "text", batch_cells: int | None = None, model: str | None = None,
          api_key: str | None = None, labels: tuple[str, str] = (" positive", " negative"),
          progress: bool = True, plots: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) a layer x scale sweep; returns the summary rows (one per cell).

    ``target``: a ``LanguageModel`` (``backend="vllm"`` recommended) or a vinterp server URL
    (``model`` names its model if not the server's; ``api_key`` for servers with keys).
    ``vector``: a :class:`SteeringVector` or a path to one. ``layers``: default the vector's.
    ``prompts``: neutral prompts for ``behavior``/``fluency`` (default: the 50 shipped);
    ``ab_questions``: for ``ab`` (default: the 40 shipped); ``ab_mode``: ``"text"`` (score
    the answers' text; default) or ``"letter"`` (next token A vs B). ``batch_cells``: cells per
    batch (default: the whole grid in one batch; smaller batches show progress sooner and
    lose less to an interruption). Cells already in ``out_dir`` are skipped.
    ``positions``: where to steer, as the kernels take it (``"all"``, ``"prompt"``,
    ``"generated"``, an int, a list of ints or a slice; absolute, negatives from the prompt's
    end).
    """
    metrics = _parse_metrics(metrics)
    if ab_mode not in AB_MODES:
        raise SweepError(f"ab_mode must be one of {list(AB_MODES)}, got {ab_mode!r}")
    if isinstance(vector, (str, os.PathLike)):
        vector = SteeringVector.load(vector)
    scales = [float(s) for s in scales]
    if not scales:
        raise SweepError("no scales given")
    if int(max_tokens) < 1:
        raise SweepError(f"max_tokens must be at least 1, got {max_tokens}")
    positions_setting = _positions_setting(positions)
    want_gen = "behavior" in metrics or "fluency" in metrics
    want_ab = "ab" in metrics
    prompts = list(neutral_prompts() if prompts is None else prompts)
    questions = list(builtin_ab_questions() if ab_questions is None else ab_questions)
    if want_gen and (not prompts or any(not str(p).strip() for p in prompts)):
        raise SweepError("no prompts given (or an empty prompt): behaviour and fluency "
                         "need prompts to generate from")
    if want_ab and not questions:
        raise SweepError("no A/B questions given: the ab metric needs them")
    tgt = _target(target, model, api_key)
    cfg = tgt.lm.config
    try:
        layers = vector.check(cfg.hidden_size, cfg.num_hidden_layers, layers)
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    plan = _plan(tgt.lm, prompts if want_gen else [], questions if want_ab else [], labels,
                 ab_mode)
    settings = {"vector": vector_hash(vector), "model": Path(str(tgt.lm.path)).name,
                "max_tokens": int(max_tokens), "metrics": metrics,
                "positions": positions_setting, "labels": list(labels),
                "prompts": _hash(plan.prompts), "ab_questions": _hash(plan.questions)}
    if want_ab:
        settings["ab_mode"] = ab_mode
        if ab_mode == "text" and positions not in (None, "all"):
            # earlier versions counted these positions from the answer's end (see
            # _text_positions): their cells are not these
            settings["ab_positions"] = "question"
    out = Path(out_dir)
    old = out / SETTINGS_FILE
    if old.is_file():
        prev = json.loads(old.read_text())
        diff = [k for k in settings if prev.get("settings", {}).get(k) != settings[k]]
        if diff:
            raise SweepError(f"{out} holds a different sweep (its {', '.join(diff)} "
                             "differ); use another output directory")
    # ---- from here on, files are written
    (out / "cells").mkdir(parents=True, exist_ok=True)
    grid = [(lay, s) for lay in layers for s in scales]
    todo = [c for c in grid if finished_cell(out / "cells", *c) is None]
    write_atomic(old, json.dumps({"settings": settings, "layers": layers, "scales": scales,
                                  "target": tgt.label, "vector_meta": vector.metadata()},
                                 indent=1))
    sw = _Sweep(lm=tgt.lm, plan=plan, vector=vector, max_tokens=int(max_tokens),
                positions=positions, want_gen=want_gen, want_ab=want_ab,
                want_beh="behavior" in metrics, want_flu="fluency" in metrics,
                metrics=metrics, trace_kw=tgt.trace_kw, remote=tgt.remote)
    size = max(1, len(todo) if not batch_cells else int(batch_cells))
    batches = [todo[i:i + size] for i in range(0, len(todo), size)]
    bar = Progress(len(grid), len(grid) - len(todo), enabled=progress)
    try:
        if tgt.remote:   # every batch submitted at once; the server batches them together
            sw.trace_kw = {**tgt.trace_kw, "blocking": False}
            started = [_Batch(sw, cells) for cells in batches]
            for b in started:
                b.score()
            for b in started:
                _write_cells(out, b.finish(), metrics)
                bar.update(len(b.cells))
        else:
            for cells in batches:
                b = _Batch(sw, cells)
                b.score()
                _write_cells(out, b.finish(), metrics)
                bar.update(len(cells))
    finally:
        bar.close()
    rows = summarize(out, layers, scales, metrics)
    write_reports(out, rows, metrics, plots=plots)
    return rows


def _write_cells(out: Path, cells: list[tuple[int, float, list[dict[str, Any]]]],
                 metrics: list[str]) -> None:
    for layer, scale, rows in cells:
        rows = sorted(rows, key=lambda r: (r["type"], r["index"]))
        summary: dict[str, Any] = {"type": "summary", "layer": layer, "scale": scale}
        for m in metrics:
            summary[m] = mean_ci(r.get(m) for r in rows if m in r)
        text = "".join(json.dumps(r) + "\n" for r in [*rows, summary])
        write_atomic(out / "cells" / cell_name(layer, scale), text)


