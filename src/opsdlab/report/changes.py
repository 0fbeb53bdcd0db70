"""Paired changes between checkpoints: accuracy and length differences on the same problems with
bootstrap 95% CIs, per run or per pipeline seed, and whether a change keeps its sign in every seed.
These are the numbers the findings, tables and figures of both reports are made of.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from opsdlab.evaluation.metrics.comparison import accuracy_efficiency_score, bootstrap_diff_ci, flips
from opsdlab.report.rundir import _samples, arm_of, checkpoint_order, opsd_seed_of, reference_of


def consistent_sign(intervals: list[tuple[float, float]]) -> int:
    """+1 if every interval lies above 0, −1 if every one lies below 0, else 0 (not a finding)."""
    if intervals and all(lo > 0 for lo, _ in intervals):
        return 1
    if intervals and all(hi < 0 for _, hi in intervals):
        return -1
    return 0


def holds_in_every_seed(by_seed: dict[int, dict], seeds: list[int], key: str) -> int:
    """`consistent_sign` of the `<key>_ci` intervals over seeds; 0 when some seed lacks the result."""
    if set(by_seed) != set(seeds):
        return 0
    return consistent_sign([tuple(d[f"{key}_ci"]) for d in by_seed.values()])


def paired_change(before, after) -> dict:
    """Paired bootstrap change of accuracy and length against the reference, the AES and the flips."""
    d = bootstrap_diff_ci(before, after)
    d["aes"] = (accuracy_efficiency_score(d["accuracy_before"], d["accuracy_after"], d["mean_length_before"],
                                          d["mean_length_after"])
                if d["accuracy_before"] > 0 and d["mean_length_before"] > 0 else None)
    d["flips"] = flips(before, after)
    return d


def arm_changes(run_dir: Path, names: list[str], set_name: str, reference: str | None) -> dict[str, dict]:
    """`paired_change` of every evaluated OPSD checkpoint against `reference`, by checkpoint name."""
    before = _samples(run_dir, str(reference), set_name) if reference else None
    if before is None:
        return {}
    return {name: paired_change(before, after) for name in names
            if name.startswith("opsd-") and (after := _samples(run_dir, name, set_name)) is not None}


def run_changes(run_dir: Path, set_name: str) -> dict[tuple[str, str], dict]:
    """(checkpoint, the checkpoint it started from) -> `paired_change`: each of sft and rlvr against
    the stage before it, each OPSD arm against its starting checkpoint."""
    changes = {key: by_seed[0] for key, by_seed in stage_changes({0: run_dir}, set_name).items()}
    names = checkpoint_order(run_dir)
    reference = reference_of(names)
    return {**changes, **{(name, reference): d for name, d in arm_changes(run_dir, names, set_name, reference).items()}}


def stage_changes(seeds: dict[int, Path], set_name: str, folder: str | None = None
                  ) -> dict[tuple[str, str], dict[int, dict]]:
    """(stage, stage before it) -> seed -> `paired_change`, for consecutive evaluated stages of base,
    sft, rlvr: what each stage did to accuracy and length, within each seed. `folder` picks another
    evaluation of each stage than the student prompt's, e.g. `<set>-teacher-solution`."""
    found: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for seed, run_dir in seeds.items():
        loaded = {n: samples for n in ("base", "sft", "rlvr")
                  if (samples := _samples(run_dir, n, folder or set_name)) is not None}
        names = list(loaded)
        for before, after in zip(names, names[1:]):
            found[(after, before)][seed] = paired_change(loaded[before], loaded[after])
    return dict(found)


def teacher_stage_changes(seeds: dict[int, Path], set_name: str) -> dict[str, dict[tuple[str, str], dict[int, dict]]]:
    """Teacher context -> `stage_changes` of the teacher prompt's own evaluations: what each stage did
    to the model's accuracy *when it reads the privileged context*. RLVR never shows that context, so
    this is whether it keeps, or erodes, the skill OPSD's teacher relies on."""
    contexts = sorted({folder.name.removeprefix(f"{set_name}-teacher-") for run_dir in seeds.values()
                       for folder in (run_dir / "eval").glob(f"*/{set_name}-teacher-*")})
    found = {context: stage_changes(seeds, set_name, f"{set_name}-teacher-{context}") for context in contexts}
    return {context: changes for context, changes in found.items() if changes}


def seed_changes(seeds: dict[int, Path], set_name: str) -> dict[str, dict[int, dict]]:
    """OPSD checkpoint -> seed -> `paired_change` against that seed's own starting checkpoint."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for seed, run_dir in seeds.items():
        names = checkpoint_order(run_dir)
        for name, d in arm_changes(run_dir, names, set_name, reference_of(names)).items():
            found[name][seed] = d
    return dict(found)


def teacher_advantages(seeds: dict[int, Path], set_name: str) -> dict[tuple[str, str], dict[int, dict]]:
    """(checkpoint, teacher context) -> seed -> paired bootstrap of teacher prompt vs student prompt
    (`accuracy_diff` = teacher avg@k − student avg@k, with its CI), where the teacher check ran."""
    found: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for seed, run_dir in seeds.items():
        for name in checkpoint_order(run_dir):
            student = _samples(run_dir, name, set_name)
            for folder in sorted((run_dir / "eval" / name).glob(f"{set_name}-teacher-*")):
                teacher = _samples(run_dir, name, folder.name)
                if student and teacher:
                    context = folder.name.removeprefix(f"{set_name}-teacher-")
                    found[(name, context)][seed] = bootstrap_diff_ci(student, teacher)
    return dict(found)


def all_arm_of(checkpoint: str) -> str:
    """The `all`-gate arm with the same OPSD seed: `opsd-unrelated-s0` -> `opsd-all-s0`."""
    return f"opsd-all-s{opsd_seed_of(checkpoint)}"


def against_all_arm(seeds: dict[int, Path], set_name: str) -> dict[str, dict[int, dict]]:
    """OPSD checkpoint -> seed -> `paired_change` against the `all` arm of the same OPSD seed: whether
    the gate or the teacher's context changed anything, compared directly rather than through RLVR."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for seed, run_dir in seeds.items():
        all_arms: dict[str, list | None] = {}  # each `all` arm read once per seed
        for name in checkpoint_order(run_dir):
            if not name.startswith("opsd-") or arm_of(name) == "all":
                continue
            reference = all_arm_of(name)
            if reference not in all_arms:
                all_arms[reference] = _samples(run_dir, reference, set_name)
            after = _samples(run_dir, name, set_name)
            if after is not None and all_arms[reference] is not None:
                found[name][seed] = paired_change(all_arms[reference], after)
    return dict(found)


def arm_teacher_context(config: dict, arm: str) -> str | None:
    """The teacher context arm `arm` trained with, from a run's resolved config: the arm's own
    `teacher_context`, else the OPSD stage's; None for an arm the config does not name."""
    for entry in config.get("arms") or []:
        if entry.get("name") == arm:
            return entry.get("teacher_context") or (config.get("opsd") or {}).get("teacher_context")
    return None


def lead_and_change(seeds: dict[int, Path], config: dict, advantages: dict, changes: dict
                    ) -> list[tuple[str, int, dict, dict]]:
    """(arm, seed, its teacher's advantage over the student prompt at the starting checkpoint, the
    arm's paired change against that checkpoint) for every seed-arm whose teacher context was
    checked there: whether what OPSD does to accuracy follows how much better its teacher is."""
    starts = {seed: reference_of(checkpoint_order(run_dir)) for seed, run_dir in seeds.items()}
    points = []
    for name, by_seed in changes.items():
        context = arm_teacher_context(config, arm_of(name))
        for seed, change in sorted(by_seed.items()):
            if (lead := advantages.get((starts[seed], context), {}).get(seed)) is not None:
                points.append((arm_of(name), seed, lead, change))
    return points
