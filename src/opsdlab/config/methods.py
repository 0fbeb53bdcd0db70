"""Compaction methods and contrast variants as settings: what each sets by default and needs of an arm.

Every arm names a compaction method (`method:`; the methods are described in `stages.methods`, which
trains them). What a method means for an arm's settings is plain data, kept here so that a config is
checked when it loads: the defaults it sets (`Method.defaults`; the arm's own overrides still win, so
`{method: crisp, gate: correct}` is CRISP on correct rollouts only), the arm keys that name the prompt
contexts its teacher reads (`Method.contexts`), and what it needs of the other settings (`check_arm`).
The `contrastive` method's `contrast_variant` (`CONTRAST_VARIANTS`; its teacher signal is built in
`loss.contrastive`) sets further defaults and has its own needs.

What an arm needs of its training data follows from the prompts its teacher reads: `Method.contexts`
names the arm keys that choose them (`opsd` and `crisp`: teacher_context; `contrastive`: teacher_context
and contrast_context; `length_rl` and `budget`: none), and `choices.CONTEXT_READS` what each context
shows. `solution_keys` is the result: the default `opsd` arm (solution) and `contrastive` (its
`unrelated` contrast) need a reference solution per problem; `crisp` (concise), `length_rl`, `budget`,
an `answer`-context arm and the `rlcsd_plugin` contrast (sibling rollouts on both sides) train on
problems and answers alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from opsdlab.config.choices import CONTEXT_READS, LENGTH_REWARDS


# ---------------------------------------------------------------- contrast variants


def _check_unrelated_solution(arm) -> None:
    if arm.contrast_context == arm.teacher_context:
        raise ValueError(f"contrast_context must differ from teacher_context ({arm.teacher_context!r}), "
                         "or the contrast is zero")


# The teacher contexts that show a solution in the reference-solution block: the incorrect sibling is
# shown in that same block, so that both teachers read an identical template.
SOLUTION_CONTEXTS = ("sibling", "solution")


def _check_rlcsd_plugin(arm) -> None:
    if arm.rollouts_per_prompt < 2:
        raise ValueError("contrast_variant rlcsd_plugin contrasts sibling rollouts of a problem; it needs "
                         "rollouts_per_prompt >= 2")
    if arm.teacher_context not in SOLUTION_CONTEXTS:
        raise ValueError(f"contrast_variant rlcsd_plugin shows the incorrect sibling in the reference-solution "
                         f"block; teacher_context must be one of {list(SOLUTION_CONTEXTS)}, got {arm.teacher_context!r}")
    if arm.top_k is not None:
        raise ValueError("contrast_variant rlcsd_plugin brings its own support (contrast_top_k tokens plus a tail); "
                         "top_k must be null")
    if arm.divergence == "sampled_reverse_kl":
        raise ValueError("contrast_variant rlcsd_plugin compares distributions on a support; divergence "
                         "sampled_reverse_kl has none")


@dataclass(frozen=True)
class ContrastVariant:
    """What a contrast variant (`contrast_variant`) sets and needs of an arm: `defaults` are arm settings
    it sets (the arm's own keys override them); `check` raises a ValueError for arm settings it cannot
    run with. How it builds the teacher signal is `loss.contrastive.VARIANTS`."""

    check: Callable
    defaults: dict = field(default_factory=dict)
    # The arm keys naming the contexts its teachers read (None: the method's, teacher_context and contrast_context).
    contexts: tuple | None = None
    # Contexts that read no reference solution under this variant: `sibling`, whose fallback to the reference
    # (a group with no correct rollout to show) is a row with no contrast pair, which carries no loss.
    solution_free: tuple = ()


CONTRAST_VARIANTS: dict[str, ContrastVariant] = {
    "unrelated_solution": ContrastVariant(check=_check_unrelated_solution),
    # The released opsd_ectr configuration: a verified sibling as the correct hint (self_rollout),
    # every rollout distilled, forward KL (its generalized JSD at beta 0) clipped at 0.05 per entry.
    # Its negative is an incorrect sibling rollout, not `contrast_context`: it trains on problems and answers.
    "rlcsd_plugin": ContrastVariant(
        check=_check_rlcsd_plugin,
        defaults={"teacher_context": "sibling", "gate": "all", "divergence": "forward_kl", "clip_tau": 0.05},
        contexts=("teacher_context",), solution_free=("sibling",)),
}


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One compaction method: what it is, and what it sets by default (its training: `stages.methods.TRAINING`)."""

    summary: str
    defaults: dict = field(default_factory=dict)
    reference: str = ""
    # The arm keys that name the prompt contexts (`prompts.TEACHER_CONTEXTS`) its teacher reads; what
    # each context reads of a problem is `choices.CONTEXT_READS`.
    contexts: tuple = ("teacher_context",)
    # settings -> further defaults that depend on the arm's other settings (contrastive: its variant's)
    option_defaults: Callable[[dict], dict] | None = None

    @property
    def uses_teacher(self) -> bool:
        """Whether it reads the model under a teacher prompt (the pipeline checks that prompt first)."""
        return bool(self.contexts)

    def defaults_for(self, settings: dict) -> dict:
        """The defaults this method sets for an arm whose settings (before them) are `settings`."""
        return {**self.defaults, **(self.option_defaults(settings) if self.option_defaults else {})}


def _variant_defaults(settings: dict) -> dict:
    """A contrastive arm's defaults from its `contrast_variant` (`CONTRAST_VARIANTS`); none for an unknown
    name, which the arm's config check then refuses."""
    variant = CONTRAST_VARIANTS.get(settings.get("contrast_variant"))
    return variant.defaults if variant is not None else {}


METHODS: dict[str, Method] = {
    "opsd": Method("on-policy self-distillation toward the model reading the reference", reference="Kim & Lee 2026"),
    "crisp": Method("self-distillation toward the model told to be concise, teacher refreshed periodically",
                    defaults={"teacher_context": "concise", "divergence": "reverse_kl", "gate": "all",
                              "teacher_weights": "periodic"},
                    reference="arXiv 2603.05433"),
    "contrastive": Method("self-distillation on the teacher's reference signal minus its signal under a negative "
                          "context (contrast_variant: another problem's solution, or RLCSD's incorrect sibling)",
                          reference="after arXiv 2606.11709",
                          option_defaults=_variant_defaults, contexts=("teacher_context", "contrast_context")),
    "length_rl": Method("RLVR continued with a truncation length penalty", reference="arXiv 2510.15110", contexts=()),
    "budget": Method("no training: responses cut at a token budget, the answer forced", contexts=()),
}


def check_method(name: str, where: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"{where}: method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def method_of(arm_overrides: dict, section, where: str) -> Method:
    """The method an arm names (its own `method`, else that of `section`, the `opsd` section)."""
    return check_method(str(arm_overrides.get("method", section.method)), where)


def check_arm(arm, where: str) -> None:
    """What a method needs of an arm's settings (an `OPSDStageConfig`), checked before anything runs."""
    if arm.method == "length_rl":
        if arm.length_reward not in LENGTH_REWARDS:
            raise ValueError(f"{where}: length_reward must be one of {sorted(LENGTH_REWARDS)}, got {arm.length_reward!r}")
        if arm.rollouts_per_prompt < 2:
            raise ValueError(f"{where}: method length_rl is group-relative RL; it needs rollouts_per_prompt >= 2")
    if arm.method == "contrastive":
        try:
            CONTRAST_VARIANTS[arm.contrast_variant].check(arm)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error


def solution_keys(arm) -> list[str]:
    """The keys (`key=context`) of an arm's settings (an `OPSDStageConfig`) whose teacher prompt reads each
    training problem's reference solution (`choices.CONTEXT_READS`); empty when the arm trains on problem +
    answer data. A contrastive arm reads what its `contrast_variant` reads (`ContrastVariant.contexts`)."""
    keys, free = METHODS[arm.method].contexts, ()
    if arm.method == "contrastive":
        variant = CONTRAST_VARIANTS[arm.contrast_variant]
        keys, free = variant.contexts or keys, variant.solution_free
    return [f"{key}={getattr(arm, key)}" for key in keys
            if CONTEXT_READS[getattr(arm, key)] == "solution" and getattr(arm, key) not in free]
