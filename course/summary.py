"""The end-of-run summary of run_course.py, read from the artifacts the notebooks wrote.

Model, device, precision, final losses, training time, responses and the judge's score.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from course import artifacts, settings


def read_summary() -> dict[str, Any]:
    """What the run produced, from notebook 05's training log, 07's responses and 09's scores.

    Reads the COURSE_* settings from os.environ (run it inside `environment(env)`).
    """
    from course import scores

    model = settings.setting("COURSE_MODEL")
    stem = artifacts.run_stem(model, settings.dataset_tag(), settings.setting("COURSE_FINETUNE"))
    evaluated = stem if settings.setting("COURSE_STAGE") == "sft" else f"{stem}-dpo"
    judge_model = settings.setting("COURSE_JUDGE_MODEL")
    summary: dict[str, Any] = {"model": model, "stem": stem, "problems": []}

    def read(kind: str, path: Path) -> Any:
        try:
            return artifacts.read_json(path, artifacts.WRITTEN_BY[kind])
        except artifacts.MissingArtifact:
            return None
        except artifacts.ArtifactError as exc:
            summary["problems"].append(str(exc))
            return None

    log = read("training-log", artifacts.path_for("training-log", stem))
    if isinstance(log, dict):  # the keys notebook 05 writes
        final = log.get("final_losses") or {}
        summary.update(
            device=log.get("device"),
            precision=log.get("precision"),
            train_loss=final.get("train"),
            val_loss=final.get("val"),
            training_minutes=log.get("duration_minutes"),
        )
    responses = read("responses", artifacts.path_for("responses", evaluated))
    if isinstance(responses, list):
        summary["responses"] = sum(
            1 for e in responses if isinstance(e, dict) and e.get("model_response") is not None
        )
    scores_path = artifacts.scores_path(evaluated, judge_model)
    if scores_path.exists():
        try:
            runs = scores.summarize_runs(scores_path)
            first = scores.score_summary(scores.load_scores(scores_path))
        except (artifacts.ArtifactError, ValueError, KeyError) as exc:
            summary["problems"].append(f"{scores_path.name}: {exc}")
        else:
            record = scores.read_scores(scores_path)
            summary.update(
                average_score=runs["mean"],
                score_std=runs["std"],
                score_runs=runs["runs"],
                scored=first["scored"],
                judge=record["judge"].get("tag") or judge_model,
            )
    if artifacts.path_for("dpo", stem).exists():
        summary["dpo_model"] = artifacts.path_for("dpo", stem).name
    exported = [artifacts.path_for(kind, stem) for kind in ("sft-gguf", "dpo-gguf")]
    if any(path.exists() for path in exported):
        summary["gguf"] = [path.name for path in exported if path.exists()]
    return summary


def _fmt(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    return format(value, spec)


def format_summary(summary: dict[str, Any], judge_note: str | None = None) -> str:
    """The end-of-run summary, one fact a line."""
    lines = ["", "Summary", f"  model              {summary['model']}"]
    if "device" in summary:
        lines.append(
            f"  device, precision  {_fmt(summary['device'])}, {_fmt(summary['precision'])}"
        )
        lines.append(
            f"  final loss         train {_fmt(summary['train_loss'], '.3f')}, "
            f"val {_fmt(summary['val_loss'], '.3f')}"
        )
        lines.append(f"  training time      {_fmt(summary['training_minutes'], '.2f')} min")
    else:
        lines.append("  training           no training log (notebook 05 has not run)")
    if "responses" in summary:
        lines.append(f"  responses written  {summary['responses']}")
    else:
        lines.append("  responses          none yet (notebook 07 has not run)")
    if judge_note:
        lines.append("  judge score        not scored:")
        lines.extend("    " + line for line in judge_note.splitlines())
    elif summary.get("average_score") is not None:
        runs = summary["score_runs"]
        spread = f" ± {summary['score_std']:.2f}" if summary.get("score_std") is not None else ""
        by = f"judge {summary['judge']}" + (f", mean of {runs} runs" if runs > 1 else "")
        lines.append(
            f"  judge score        average {summary['average_score']:.2f}{spread} over "
            f"{summary['scored']} responses ({by})"
        )
    else:
        lines.append("  judge score        none yet (notebook 09 has not run)")
    if "dpo_model" in summary:
        lines.append(f"  DPO model (bonus)  {summary['dpo_model']}")
    if "gguf" in summary:
        lines.append(f"  GGUF (bonus)       {', '.join(summary['gguf'])}")
    for problem in summary.get("problems", []):
        lines.append(f"  problem            {problem}")
    if summary["model"] == settings.OFFLINE_MODEL:
        lines.append("  (the offline model has random weights: its responses and scores are noise)")
    return "\n".join(lines)
