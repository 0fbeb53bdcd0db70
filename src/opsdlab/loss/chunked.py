"""Per-token divergence from final hidden states to summed loss, one row chunk at a time.

:func:`chunked_divergence` goes from the student's and teacher's final hidden states to the summed
loss without ever materializing the ``(N, V)`` logits of all tokens at once: it processes row chunks
and takes each chunk's gradient right after its loss (``_GradientInForward``, for a head whose
parameters are named), or recomputes the chunk under activation checkpointing (for a head whose
parameters are not named), so forward and backward hold one chunk's logits. At V = 151,936 the
logits of 4,096 tokens are 2.5 GB per float32 copy, and a divergence needs several copies.
:func:`naive_divergence` is the same computation done in one shot; it is the reference for tests
and the memory benchmark.

Each token's loss may be weighted (``token_weight_N``, `positions`) and may add a KL to an anchor model
(:class:`Anchor`); :func:`sampled_log_probs` gives each side's log-probability of the sampled tokens
alone, chunk by chunk, without gradient. The per-token divergences themselves, their options and the
precision rules are in
:mod:`opsdlab.loss.divergences`; a teacher head may return a
:class:`~opsdlab.loss.targets.SupportTarget` instead of logits. Tensor names carry their axes
as a suffix: ``N`` kept response tokens (``n`` within a chunk), ``V`` vocabulary, ``D`` hidden size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opsdlab.loss.divergences import (_DEFAULT_OPTIONS, DivergenceFn, DivergenceOptions, _lookup, _rowdot, _upcast,
                                      reverse_kl)
from opsdlab.loss.targets import SupportTarget, _from_log_probs

__all__ = ["Anchor", "chunked_divergence", "naive_divergence", "sampled_log_probs"]


_STAT_KEYS = ("loss_N", "student_entropy_N", "teacher_entropy_N", "student_logp_N", "teacher_logp_N", "weight_N",
              "anchor_kl_N")


@dataclass(frozen=True)
class Anchor:
    """A model the student is held near: each token's loss adds ``beta x KL(p_S || p_A)`` (full vocabulary,
    at the same temperature, no clip or top-k), p_A from ``head(hidden_ND)`` at the student's own
    positions (StableOPD's guard against collapse, arXiv 2604.08527). No gradient reaches the anchor."""

    hidden_ND: Tensor
    head: Callable[[Tensor], Tensor]
    beta: float

# One chunk's per-name row groups: (divergence fn, row indices within the chunk
# or None meaning "all rows").
_Groups = list[tuple[DivergenceFn, "Tensor | None"]]


def _resolve_names(names: str | list[str], n_tokens: int) -> list[tuple[DivergenceFn, list[int] | None]]:
    """Turn ``names`` into ``[(fn, global row indices or None for all rows)]``."""
    if isinstance(names, str):
        return [(_lookup(names), None)]
    names = list(names)
    if len(names) != n_tokens:
        raise ValueError(f"names has {len(names)} entries but there are {n_tokens} tokens")
    rows_by_name: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows_by_name.setdefault(name, []).append(i)
    fns = [(_lookup(name), rows) for name, rows in rows_by_name.items()]
    if len(fns) == 1:
        return [(fns[0][0], None)]
    return fns


def _groups_for_range(
    resolved: list[tuple[DivergenceFn, list[int] | None]], start: int, end: int, device: torch.device
) -> _Groups:
    """Restrict the resolved name groups to rows ``[start, end)`` (chunk-local indices)."""
    groups: _Groups = []
    for fn, rows in resolved:
        if rows is None:
            groups.append((fn, None))
            continue
        local = [r - start for r in rows if start <= r < end]
        if local:
            groups.append((fn, torch.tensor(local, dtype=torch.long, device=device)))
    if len(groups) == 1 and groups[0][1] is not None and groups[0][1].numel() == end - start:
        groups = [(groups[0][0], None)]
    return groups


def _loss_and_stats(
    student_hidden_nD: Tensor,
    teacher_hidden_nD: Tensor,
    sampled_ids_n: Tensor,
    groups: _Groups,
    token_weight_n: Tensor | None = None,
    anchor_hidden_nD: Tensor | None = None,
    *,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    options: DivergenceOptions,
    temperature: float = 1.0,
    anchor_head: Callable[[Tensor], Tensor] | None = None,
    anchor_beta: float = 0.0,
) -> tuple[Tensor, ...]:
    """Logits, per-token losses and detached stats for one block of rows.

    Returns ``(loss_sum, loss_n, student_entropy_n, teacher_entropy_n,
    student_logp_n, teacher_logp_n, weight_n, anchor_kl_n)``; only ``loss_sum`` carries grad.
    ``loss_sum`` is ``sum_n w_n (D_n + beta KL_n)``: the divergence ``loss_n`` plus the anchor's
    ``beta x anchor_kl_n`` when an anchor is given, times ``token_weight_n`` when given. Each
    side's logits are normalized once (one log-softmax) for both the loss and
    the stats. The loss is computed first and the stats last, under
    ``no_grad``: with non-reentrant checkpointing (early stop) the backward
    recomputation then stops after the loss graph and never redoes the stats.
    The teacher head returns logits, or a :class:`SupportTarget` that is taken as it is.
    """
    s_nV = _upcast(student_head(student_hidden_nD))
    if temperature != 1.0:
        s_nV = s_nV / temperature
    logp_s_nV = F.log_softmax(s_nV, dim=-1)  # its backward keeps only its output, not the logits
    del s_nV
    with torch.no_grad():
        target = teacher_head(teacher_hidden_nD)
        if isinstance(target, SupportTarget):
            logp_t_nV, weight_n = target.teacher_log_probs_NV, target.weight_N
        else:
            t_nV = _upcast(target)
            if temperature != 1.0:
                t_nV = t_nV / temperature
            target = logp_t_nV = F.log_softmax(t_nV, dim=-1)
            weight_n = logp_s_nV.new_ones(logp_s_nV.shape[0])
            del t_nV

    if len(groups) == 1 and groups[0][1] is None:
        loss_n = _from_log_probs(groups[0][0], logp_s_nV, target, sampled_ids_n, options)
    else:
        loss_n = logp_s_nV.new_zeros(logp_s_nV.shape[0])
        for fn, rows in groups:
            part = _from_log_probs(
                fn,
                logp_s_nV.index_select(0, rows),
                target.rows(rows) if isinstance(target, SupportTarget) else target.index_select(0, rows),
                sampled_ids_n.index_select(0, rows),
                options,
            )
            loss_n = loss_n.index_copy(0, rows, part)
    token_loss_n = loss_n
    if anchor_hidden_nD is not None:
        with torch.no_grad():
            a_nV = _upcast(anchor_head(anchor_hidden_nD))
            logp_a_nV = F.log_softmax(a_nV / temperature if temperature != 1.0 else a_nV, dim=-1)
            del a_nV
        anchor_kl_n = _from_log_probs(reverse_kl, logp_s_nV, logp_a_nV, sampled_ids_n, _DEFAULT_OPTIONS)
        del logp_a_nV
        token_loss_n = loss_n + anchor_beta * anchor_kl_n
    else:
        anchor_kl_n = loss_n.new_zeros(loss_n.shape)
    loss_sum = (token_loss_n if token_weight_n is None else token_loss_n * token_weight_n).sum()

    with torch.no_grad():
        ids_n1 = sampled_ids_n.unsqueeze(-1)
        teacher_logp_n = logp_t_nV.gather(-1, ids_n1).squeeze(-1)
        teacher_entropy_n = -_rowdot(logp_t_nV.exp(), logp_t_nV)
        del logp_t_nV, target
        logp_s_nV = logp_s_nV.detach()
        student_logp_n = logp_s_nV.gather(-1, ids_n1).squeeze(-1)
        student_entropy_n = -_rowdot(logp_s_nV.exp(), logp_s_nV)
    return (loss_sum, loss_n.detach(), student_entropy_n, teacher_entropy_n, student_logp_n, teacher_logp_n,
            weight_n.detach(), anchor_kl_n.detach())


def _check_hidden(
    student_hidden_ND: Tensor, teacher_hidden_ND: Tensor, sampled_ids_N: Tensor
) -> int:
    if student_hidden_ND.dim() != 2 or teacher_hidden_ND.dim() != 2:
        raise ValueError(
            "hidden states must be [N, D]; got student "
            f"{tuple(student_hidden_ND.shape)} and teacher {tuple(teacher_hidden_ND.shape)}"
        )
    n_tokens = student_hidden_ND.shape[0]
    if teacher_hidden_ND.shape[0] != n_tokens:
        raise ValueError(
            f"student has {n_tokens} tokens but teacher has {teacher_hidden_ND.shape[0]}"
        )
    if sampled_ids_N.shape != (n_tokens,):
        raise ValueError(f"sampled_ids_N must be [{n_tokens}], got {tuple(sampled_ids_N.shape)}")
    if sampled_ids_N.dtype != torch.long:
        raise ValueError(f"sampled_ids_N must be torch.long, got {sampled_ids_N.dtype}")
    return n_tokens


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _empty_result(student_hidden_ND: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    dtype = torch.promote_types(student_hidden_ND.dtype, torch.float32)
    zero = (student_hidden_ND.sum() * 0).to(dtype)  # keeps the graph so backward() works
    empty = student_hidden_ND.new_zeros(0, dtype=dtype)
    return zero, {k: empty for k in _STAT_KEYS}


class _GradientInForward(torch.autograd.Function):
    """The summed loss of all chunks, its gradient computed chunk by chunk during the forward.

    `run(hidden_ND, params)` returns ``(loss_sum, grad_hidden_ND, grad_params)``: the gradient of the
    loss with respect to the student's hidden states and the head's parameters. The backward only
    scales them by the incoming gradient, so no chunk's logits are computed a second time.
    """

    @staticmethod
    def forward(ctx, run, student_hidden_ND, *params):
        loss_sum, grad_hidden, grad_params = run(student_hidden_ND, params)
        ctx.grads = (grad_hidden, grad_params)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_params = ctx.grads
        del ctx.grads
        scale = grad_loss.float()
        return (None, (grad_hidden * scale).to(grad_hidden.dtype),
                *(None if g is None else (g * scale).to(g.dtype) for g in grad_params))


def chunked_divergence(
    student_hidden_ND: Tensor,
    teacher_hidden_ND: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    sampled_ids_N: Tensor,
    names: str | list[str],
    options: DivergenceOptions | None = None,
    chunk_size: int = 256,
    temperature: float = 1.0,
    head_params: Sequence[Tensor] | None = None,
    token_weight_N: Tensor | None = None,
    anchor: Anchor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed per-token divergence from hidden states, one row chunk at a time.

    Args:
        student_hidden_ND: Final hidden states of the student at the ``N`` kept
            response positions (already selected and flattened); carries grad.
        teacher_hidden_ND: Teacher hidden states at the same positions; it is
            detached here, so no gradient reaches the teacher pass.
        student_head / teacher_head: Map hidden states to logits (e.g. the
            shared ``model.lm_head``). The teacher head runs under
            ``no_grad``, so a shared head's weights get gradient only through
            the student logits. It may return a :class:`SupportTarget`
            instead of logits: the loss is then taken on its support and
            weighted per token.
        sampled_ids_N: The response token at each position (``torch.long``).
        names: One divergence name for all tokens, or a list of ``N`` names
            (a "split" arm can use reverse KL on some rows and forward KL on
            others).
        options: :class:`DivergenceOptions` (defaults if None).
        chunk_size: Rows per chunk; the last chunk may be shorter. The
            default 256 keeps peak memory at ~1/14 of the one-shot version
            for 4,096 tokens at V = 151,936 (see
            ``benchmarks/opsd_loss_memory.py``); 512 already misses 1/8.
        temperature: Both sides' logits are divided by it (in float32) before
            any softmax: the distributions compared are those the response
            was sampled from at this temperature, as TRL's log-probabilities.
            The stats are of the same tempered distributions.
        head_params: The trainable tensors ``student_head`` reads (the LM
            head's weight; ``[]`` for a frozen head). Given, and with
            gradients on, each chunk's gradient with respect to the hidden
            rows and these tensors is computed in the forward, right after
            its loss, and the backward only scales it: the head's product
            runs four times per chunk (student logits, teacher logits, the
            two gradient products) instead of six (checkpointing recomputes
            both sides' logits). The price is memory held from forward to
            backward: one ``[N, D]`` gradient and each tensor's gradient (the
            head weight's size, in its dtype, summed over chunks as autograd
            would sum them into ``.grad``). None: activation checkpointing,
            as below, for a head whose parameters cannot be named (nothing
            extra is held between forward and backward).
        token_weight_N: Each token's loss weight (``[N]``, no gradient), or
            None for 1: the sum is ``sum_n w_n l_n``.
        anchor: An :class:`Anchor` (hidden states at the same ``N``
            positions): each token's loss ``l_n`` is the divergence plus
            ``beta x KL(p_S || p_A)``, scored in the same chunks (one more head
            product per chunk, without gradient).

    Returns:
        ``(loss_sum, stats)``: the *sum* of per-token losses as a float32
        scalar with grad (the caller divides by its own, possibly global,
        token count), and detached ``[N]`` tensors ``loss_N``,
        ``student_entropy_N``, ``teacher_entropy_N``, ``student_logp_N`` and
        ``teacher_logp_N`` (full-vocabulary quantities, independent of
        ``top_k``), ``weight_N``, each token's loss weight (1 unless
        a :class:`SupportTarget` sets it; ``token_weight_N`` is apart), and
        ``anchor_kl_N`` (0 without an anchor). ``loss_N`` is the divergence
        alone: unweighted, without the anchor's term.

    Memory, without ``head_params``: each chunk runs under ``torch.utils.checkpoint.checkpoint(...,
    use_reentrant=False)``. The forward keeps only the chunk's inputs (hidden
    rows, ids) and the backward recomputes one chunk's logits at a time
    (autograd finishes a chunk's subgraph before starting the next), so peak
    extra memory is ``O(chunk_size * V)`` instead of ``O(N * V)``. The price
    is a second forward of the head and divergence per chunk.
    """
    options = _DEFAULT_OPTIONS if options is None else options
    if not isinstance(options, DivergenceOptions):
        raise ValueError(f"options must be a DivergenceOptions or None, got {type(options).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_temperature(temperature)
    n_tokens = _check_hidden(student_hidden_ND, teacher_hidden_ND, sampled_ids_N)
    resolved = _resolve_names(names, n_tokens)
    extras = _check_extras(token_weight_N, anchor, n_tokens)
    if n_tokens == 0:
        return _empty_result(student_hidden_ND)
    teacher_hidden_ND = teacher_hidden_ND.detach()
    block = _block(student_head, teacher_head, options, temperature, anchor)

    if head_params is not None and torch.is_grad_enabled() and student_hidden_ND.requires_grad:
        return _chunked_gradient_in_forward(block, student_hidden_ND, teacher_hidden_ND, sampled_ids_N,
                                            resolved, chunk_size, list(head_params), extras)
    loss_sums: list[Tensor] = []
    stat_parts: list[tuple[Tensor, ...]] = []
    for start, end, groups in _chunks(resolved, n_tokens, chunk_size, sampled_ids_N.device):
        loss_sum, *stats = checkpoint(
            block,
            student_hidden_ND[start:end],
            teacher_hidden_ND[start:end],
            sampled_ids_N[start:end],
            groups,
            *_rows(extras, start, end),
            use_reentrant=False,
        )
        loss_sums.append(loss_sum)
        stat_parts.append(tuple(stats))
    return _summed(loss_sums), _stats_by_key(stat_parts)


def _check_extras(token_weight_N: Tensor | None, anchor: Anchor | None, n_tokens: int) -> tuple:
    """``(token weights or None, anchor hidden states or None)``, checked against the ``n_tokens`` rows."""
    if token_weight_N is not None:
        if token_weight_N.shape != (n_tokens,) or not token_weight_N.is_floating_point():
            raise ValueError(f"token_weight_N must be a float [{n_tokens}], got {token_weight_N.dtype} "
                             f"{tuple(token_weight_N.shape)}")
        token_weight_N = token_weight_N.detach()
    anchor_hidden_ND = None
    if anchor is not None:
        anchor_hidden_ND = anchor.hidden_ND.detach()
        if anchor_hidden_ND.dim() != 2 or anchor_hidden_ND.shape[0] != n_tokens:
            raise ValueError(f"anchor hidden states must be [{n_tokens}, D], got {tuple(anchor_hidden_ND.shape)}")
    return token_weight_N, anchor_hidden_ND


def _rows(extras: tuple, start: int, end: int) -> tuple:
    """Rows ``[start, end)`` of each of `_check_extras`' tensors (None stays None)."""
    return tuple(None if t is None else t[start:end] for t in extras)


def _block(student_head, teacher_head, options, temperature, anchor: Anchor | None):
    """`_loss_and_stats` with the heads, options and anchor settings bound."""
    return functools.partial(
        _loss_and_stats, student_head=student_head, teacher_head=teacher_head, options=options,
        temperature=float(temperature), anchor_head=None if anchor is None else anchor.head,
        anchor_beta=0.0 if anchor is None else float(anchor.beta),
    )


def _chunks(resolved, n_tokens: int, chunk_size: int, device: torch.device):
    """``(start, end, name groups)`` of each row chunk, in order."""
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        yield start, end, _groups_for_range(resolved, start, end, device)


def _summed(loss_sums: list[Tensor]) -> Tensor:
    return loss_sums[0] if len(loss_sums) == 1 else torch.stack(loss_sums).sum()


def _stats_by_key(stat_parts: list[tuple[Tensor, ...]]) -> dict[str, Tensor]:
    """The chunks' detached per-token stats, concatenated per key of `_STAT_KEYS`."""
    return {key: torch.cat([p[i] for p in stat_parts]) for i, key in enumerate(_STAT_KEYS)}


def _chunked_gradient_in_forward(block, student_hidden_ND: Tensor, teacher_hidden_ND: Tensor, sampled_ids_N: Tensor,
                                 resolved, chunk_size: int, head_params: list[Tensor],
                                 extras: tuple) -> tuple[Tensor, dict[str, Tensor]]:
    """`chunked_divergence` with each chunk's gradient taken in the forward (`_GradientInForward`)."""
    n_tokens = student_hidden_ND.shape[0]
    stat_parts: list[tuple[Tensor, ...]] = []

    def run(hidden_ND: Tensor, params: tuple[Tensor, ...]):
        grad_hidden = torch.empty_like(hidden_ND)
        grad_params: list[Tensor | None] = [None] * len(params)
        loss_sums = []
        for start, end, groups in _chunks(resolved, n_tokens, chunk_size, sampled_ids_N.device):
            with torch.enable_grad():
                rows = hidden_ND[start:end].detach().requires_grad_(True)
                # The head reads a view, not the leaf: a module hook that waits for all its inputs'
                # gradients (`register_multi_grad_hook`, e.g. FlopCounterMode's module tracker) cannot
                # be given a leaf inside `autograd.grad`.
                loss_sum, *stats = block(rows.view_as(rows), teacher_hidden_ND[start:end], sampled_ids_N[start:end],
                                         groups, *_rows(extras, start, end))
                grads = torch.autograd.grad(loss_sum, (rows, *params), allow_unused=True)
            grad_hidden[start:end] = 0.0 if grads[0] is None else grads[0]
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
            loss_sums.append(loss_sum.detach())
            stat_parts.append(tuple(stats))
        return _summed(loss_sums), grad_hidden, grad_params

    total = _GradientInForward.apply(run, student_hidden_ND, *head_params)
    return total, _stats_by_key(stat_parts)


def naive_divergence(
    student_hidden_ND: Tensor,
    teacher_hidden_ND: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    sampled_ids_N: Tensor,
    names: str | list[str],
    options: DivergenceOptions | None = None,
    chunk_size: int = 256,
    temperature: float = 1.0,
    token_weight_N: Tensor | None = None,
    anchor: Anchor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Same contract as :func:`chunked_divergence`, computed in one shot.

    Materializes the full ``[N, V]`` student and teacher logits and keeps the
    autograd intermediates of all tokens alive until backward. It is the
    reference for tests and the memory benchmark, not for training at large
    ``N * V``. ``chunk_size`` is accepted for signature compatibility and
    ignored.
    """
    options = _DEFAULT_OPTIONS if options is None else options
    if not isinstance(options, DivergenceOptions):
        raise ValueError(f"options must be a DivergenceOptions or None, got {type(options).__name__}")
    _check_temperature(temperature)
    n_tokens = _check_hidden(student_hidden_ND, teacher_hidden_ND, sampled_ids_N)
    resolved = _resolve_names(names, n_tokens)
    extras = _check_extras(token_weight_N, anchor, n_tokens)
    if n_tokens == 0:
        return _empty_result(student_hidden_ND)
    groups = _groups_for_range(resolved, 0, n_tokens, sampled_ids_N.device)
    total, *stats = _block(student_head, teacher_head, options, temperature, anchor)(
        student_hidden_ND, teacher_hidden_ND.detach(), sampled_ids_N, groups, *extras)
    return total, dict(zip(_STAT_KEYS, stats))


@torch.no_grad()
def sampled_log_probs(hidden_ND: Tensor, head: Callable[[Tensor], Tensor], sampled_ids_N: Tensor,
                      chunk_size: int = 256, temperature: float = 1.0) -> Tensor:
    """``log p(y_n)`` of each sampled token at the temperature (float32 ``[N]``, no gradient), from hidden
    states through ``head`` one row chunk at a time: the same log-probabilities as the stats of
    :func:`chunked_divergence`, without a ``[N, V]`` tensor or the divergence."""
    _check_temperature(temperature)
    parts = []
    for start in range(0, hidden_ND.shape[0], chunk_size):
        logits_nV = _upcast(head(hidden_ND[start:start + chunk_size]))
        if temperature != 1.0:
            logits_nV = logits_nV / temperature
        ids_n1 = sampled_ids_N[start:start + chunk_size].unsqueeze(-1)
        parts.append((logits_nV.gather(-1, ids_n1) - torch.logsumexp(logits_nV, dim=-1, keepdim=True)).squeeze(-1))
    if not parts:
        return hidden_ND.new_zeros(0, dtype=torch.promote_types(hidden_ND.dtype, torch.float32))
    return torch.cat(parts)
