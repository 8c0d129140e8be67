"""The operator's policy over what a client may ask for: modes and target FPRs (issue 21).

In enforce mode a rejected image's answer is its verdict only (no label, probabilities, scores
or threshold). A client must not be able to undo that:

- `mode`: a request may name a mode its client is allowed. By default enforce always, and
  annotate only when the deployment's own mode (`RCEGATE_MODE`) is annotate; the deployment
  sets another list with `client_modes`, and an API key its own with `client_policies`. A
  request that names no mode gets the deployment's mode when its client is allowed it, else
  enforce. Any other mode: 403 `forbidden`.
- `target_fpr`: a client held to enforce (not allowed annotate) may ask only for a decision at
  least as strict as the served one: the threshold at its target_fpr must not be below the
  threshold at the served target_fpr. A looser threshold would accept what the operator's
  rejects, and bisecting target_fpr recovered a withheld score to 6 digits in 31 queries.
  Stricter thresholds reveal nothing about a rejected image (it stays rejected).
  `client_looser_target_fpr` (or the key's `looser_target_fpr`) lifts this. Otherwise 403.

Thresholds are compared, not FPRs, so a calibration table of any shape cannot make a
"stricter" FPR a looser decision. No web imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.detector import Decision, Detector
from service.errors import Forbidden
from service.settings import Mode, Settings

KEY_PREFIX = "key:"  # how service.access names a client with an API key


@dataclass(frozen=True)
class Allowed:
    """What one client may ask for."""

    modes: frozenset[Mode]
    default: Mode
    looser_target_fpr: bool

    @property
    def held_to_enforce(self) -> bool:
        return "annotate" not in self.modes


def _allowed(modes: list[Mode], deployment: Mode, looser: bool) -> Allowed:
    chosen = frozenset(modes)
    default: Mode = deployment if deployment in chosen else "enforce"
    if default not in chosen:
        default = modes[0]
    return Allowed(chosen, default, looser)


class Policy:
    def __init__(self, settings: Settings) -> None:
        modes: list[Mode] = settings.client_modes or (
            ["annotate", "enforce"] if settings.mode == "annotate" else ["enforce"]
        )
        self._default = _allowed(modes, settings.mode, settings.client_looser_target_fpr)
        self._keys = {
            ident: _allowed(policy.modes, settings.mode, policy.looser_target_fpr)
            for ident, policy in settings.client_policies.items()
        }

    def allowed(self, client: str | None) -> Allowed:
        """What `client` (`key:<id>`, `addr:<ip>` or None) may ask for."""
        if client is not None and client.startswith(KEY_PREFIX):
            return self._keys.get(client[len(KEY_PREFIX) :], self._default)
        return self._default

    def resolve(
        self, detector: Detector, mode: Mode | None, target_fpr: float | None, client: str | None
    ) -> tuple[Decision, Mode]:
        """The decision and mode a request gets; Forbidden when it asks for more than its
        client may have, InvalidParameter for a target_fpr outside the calibration."""
        allowed = self.allowed(client)
        if mode is None:
            mode = allowed.default
        elif mode not in allowed.modes:
            raise Forbidden(
                f"mode {mode} is not permitted for this client (permitted: "
                f"{', '.join(sorted(allowed.modes))})"
            )
        decision = detector.decision(target_fpr)
        if target_fpr is not None and allowed.held_to_enforce and not allowed.looser_target_fpr:
            served = detector.decision()
            if decision.threshold < served.threshold:
                raise Forbidden(
                    f"target_fpr {target_fpr:g} gives a looser decision than the served "
                    f"target_fpr {served.target_fpr:g}; this client may only ask for one at "
                    "least as strict"
                )
        return decision, mode
