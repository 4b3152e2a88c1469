"""Which SFT model a DPO model was made from: notebook 10's log records it, and
`check_dpo_model` stops a DPO model whose SFT model changed since. Used by
course.responses (COURSE_STAGE=dpo in notebooks 07-09 and 11).
"""

from __future__ import annotations

from course.artifacts import sha256_of_file

# the key of notebook 10's DPO log that holds the SHA-256 of the SFT weights it started from
SFT_SHA256_KEY = "sft_sha256"


def check_dpo_model(stem: str) -> None:
    """Stop when run `stem`'s DPO model was not made from its current SFT model.

    Notebook 10 records in its DPO log the SHA-256 of the `-sft.pth` it started from and
    the prompt style it used. When notebook 05 has trained again since, or with another
    prompt style, the DPO model belongs to another run: using it (COURSE_STAGE=dpo in
    notebooks 07-09 and 11) would score a model made from weights that are gone. A log
    written before the hash was recorded is only reported.
    """
    from course import artifacts

    dpo_path = artifacts.path_for("dpo", stem)
    log_path = artifacts.path_for("dpo-log", stem)
    if not log_path.exists():
        print(f"{log_path.name} is missing: which SFT model {dpo_path.name} came from is unknown.")
        return
    log = artifacts.read_json(log_path, artifacts.WRITTEN_BY["dpo-log"])
    log = log if isinstance(log, dict) else {}
    problems = []
    sft_path = artifacts.path_for("sft", stem)
    recorded = log.get(SFT_SHA256_KEY)
    if recorded is None:
        print(
            f"{log_path.name} does not record which SFT weights {dpo_path.name} started from "
            "(an earlier version of notebook 10 wrote it); run notebook 10 again to record them."
        )
    elif sft_path.exists() and sha256_of_file(sft_path) != recorded:
        problems.append(
            f"{sft_path.name} is not the SFT model it started from (notebook 05 trained again "
            f"since: SHA-256 {recorded[:12]}... then, {sha256_of_file(sft_path)[:12]}... now)"
        )
    dpo_style = (log.get("config") or {}).get("prompt_style")
    try:
        sft_style = artifacts.read_training_log(stem)["config"].get("prompt_style")
    except artifacts.ArtifactError:
        sft_style = None
    if dpo_style and sft_style and dpo_style != sft_style:
        problems.append(
            f"it used {dpo_style!r} prompts, notebook 05's run {stem} uses {sft_style!r}"
        )
    if problems:
        raise artifacts.ArtifactError(
            f"{dpo_path.name} was made by notebook 10 from another SFT model: "
            + "; ".join(problems)
            + ". Run notebook 10_preference_tuning_with_dpo again to make the DPO model "
            "from the current one, or unset COURSE_STAGE to use notebook 05's model."
        )
