"""The preference objectives as formulas over per-answer log-probabilities.

Each follows TRL's implementation of the same name (tests compare loss and gradient with TRL):

- ``dpo``: DPOTrainer, ``loss_type="sigmoid"`` (with ``label_smoothing``: conservative DPO).
- ``ipo``: DPOTrainer, ``loss_type="ipo"``: log-ratios averaged per answer token.
- ``orpo``: ORPOTrainer's odds-ratio term, ``beta`` its weight; plus the chosen answer's NLL.
- ``simpo``: CPOTrainer, ``loss_type="simpo"``: mean log-probabilities, margin ``simpo_gamma``,
  plus ``cpo_alpha`` times the chosen answer's NLL (0, pure SimPO, by default).
- ``kto``: KTOTrainer, ``loss_type="kto"``: unpaired answers against a batch KL estimate.

Rewards are what TRL logs: ``beta`` times the policy/reference log-ratio (DPO, IPO, KTO) or
``beta`` times the policy's mean log-probability (ORPO, SimPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.config import OBJECTIVES as OBJECTIVES  # re-exported: the one list

WITH_REFERENCE = ("dpo", "ipo", "kto")
# objectives that score answers by their mean token log-probability instead of the sum
LENGTH_NORMALISED = ("ipo", "orpo", "simpo")


@dataclass
class Settings:
    """An objective's own settings (config keys of the same names)."""

    objective: str
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def pair_losses(
    settings: Settings,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None = None,
    reference_rejected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) for a paired objective.

    ``chosen``/``rejected`` (pairs,) are the policy's answer log-probabilities: sums for dpo,
    per-token means for ipo/orpo/simpo; ``reference_*`` likewise (dpo/ipo only). ORPO's and
    SimPO's NLL term is added by the caller (it is a token mean over the batch, as in TRL).
    """
    beta, smoothing = settings.beta, settings.label_smoothing
    if settings.objective in ("dpo", "ipo"):
        assert reference_chosen is not None and reference_rejected is not None
        chosen_ratio = chosen - reference_chosen
        rejected_ratio = rejected - reference_rejected
        delta = chosen_ratio - rejected_ratio
        if settings.objective == "dpo":
            losses = (
                -F.logsigmoid(beta * delta) * (1 - smoothing)
                - F.logsigmoid(-beta * delta) * smoothing
            )
        else:  # IPO's squared distance of the (length-averaged) margin from 1/(2 beta)
            losses = (delta - 1 / (2 * beta)) ** 2
        return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    if settings.objective == "orpo":
        chosen, rejected = chosen.float(), rejected.float()
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        # TRL's loss is nll - beta * mean(logsigmoid(log_odds)): the per-pair part, negated
        losses = -beta * F.logsigmoid(log_odds)
        return losses, beta * chosen.detach(), beta * rejected.detach()
    if settings.objective == "simpo":
        logits = (chosen - rejected) - settings.simpo_gamma / beta
        losses = (
            -F.logsigmoid(beta * logits) * (1 - smoothing)
            - F.logsigmoid(-beta * logits) * smoothing
        )
        return losses, beta * chosen.detach(), beta * rejected.detach()
    raise ValueError(f"not a paired objective: {settings.objective}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (as TRL's log1mexp)."""
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


def kto_losses(
    settings: Settings,
    logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_logps: torch.Tensor,
    kl_reference_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted per-answer loss, rewards, kl) of KTO.

    ``logps``/``reference_logps`` (answers,) are summed log-probabilities, ``desirable``
    (answers,) booleans; ``kl_*`` the log-probabilities of mismatched prompt/answer pairs,
    whose mean policy/reference gap (detached, at least 0) is KTO's reference point.
    """
    beta = settings.beta
    kl = (kl_logps - kl_reference_logps).mean().detach().clamp(min=0)
    ratio = logps - reference_logps
    desirable_loss = 1 - torch.sigmoid(beta * (ratio - kl))
    undesirable_loss = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(
        desirable,
        settings.desirable_weight * desirable_loss,
        settings.undesirable_weight * undesirable_loss,
    )
    return losses, beta * ratio.detach(), kl
