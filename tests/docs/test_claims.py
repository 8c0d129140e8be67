"""The figures the README and the docs' overview state match the committed evidence: the
evaluation reports (reports/*/results.json) and the benchmark results (bench/results/*.json).

Each claim is a pattern over the page's text (whitespace collapsed) whose groups capture the
figures as written, and the same figures computed from the evidence. A page reworded so that a
pattern no longer matches fails too: update the pattern with the text, never the figure alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest

from tests.conftest import ROOT
from training.report import verdicts
from training.results import EvaluationResults

WORDS = ["no", "one", "two", "three", "four", "five", "six"]
METRIC_NAMES = {"log_kd": "log K-density", "non_me": "non-ME", "confidence": "confidence"}


@cache
def report(dataset: str) -> EvaluationResults:
    return EvaluationResults.read(ROOT / "reports" / dataset / "results.json")


@cache
def bench(name: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(
        (ROOT / "bench" / "results" / f"{name}.json").read_text()
    )
    return result


def rce(dataset: str = "mnist-5k"):  # type: ignore[no-untyped-def]
    return report(dataset).models["rce"]


def detected(attack: str) -> float:
    model = rce()
    rate = model.attacks[attack].metrics[model.default_metric].detection_rate
    assert rate is not None
    return rate


def undetected(attack: str) -> float:
    return rce().attacks[attack].undetected_success_rate


def span(values: list[float]) -> str:
    """Rates as a page writes a range of them: '60-86%', or '21%' when they round alike."""
    low, high = round(100 * min(values)), round(100 * max(values))
    return f"{low}%" if low == high else f"{low}-{high}%"


def reproduced(dataset: str) -> str:
    rows = verdicts(report(dataset))
    return WORDS[sum(row[3] == "reproduced" for row in rows)]


@dataclass(frozen=True)
class Claim:
    page: str
    pattern: str
    figures: Callable[[], tuple[str, ...]]


ATTACKER_TABLE = [
    (r"\(C&W-L2, JSMA\) \| (\S+) \|", lambda: (span([detected("cw-l2"), detected("jsma")]),)),
    (r"\(FGSM, BIM\) \| (\S+) \|", lambda: (span([detected("fgsm"), detected("bim")]),)),
    (
        r"(\d+)-step PGD that ignores it \| (\S+) \|",
        lambda: (str(rce().attacks["pgd"].params["steps"]), span([detected("pgd")])),
    ),
    (
        r"\(C&W-wb, adaptive PGD\) \| \*\*(\S+)\*\*: (\S+) of digits end accepted and "
        r"misclassified",
        lambda: (
            span([detected("cw-wb"), detected("pgd-adaptive")]),
            span([undetected("cw-wb"), undetected("pgd-adaptive")]),
        ),
    ),
]

PAPER_CLAIMS = (
    r"Of the paper's (\w+) headline claims, (\w+) reproduces? on the committed MNIST models "
    r"and (\w+) on Fashion-MNIST",
    lambda: (
        WORDS[len(verdicts(report("mnist-5k")))],
        reproduced("mnist-5k"),
        reproduced("fashion-mnist"),
    ),
)

CLAIMS = [
    *(Claim("README.md", pattern, figures) for pattern, figures in ATTACKER_TABLE),
    Claim(
        "README.md",
        r"detection score \((.+?) by default\)",
        lambda: (METRIC_NAMES.get(rce().default_metric, rce().default_metric),),
    ),
    Claim(
        "README.md",
        r"by default (\S+) of clean images are rejected by design",
        lambda: (span([rce().target_fpr]),),
    ),
    Claim(
        "README.md",
        r"attacked with L-inf budget (\S+) ",
        lambda: (f"{report('mnist-5k').settings['eps']:g}",),
    ),
    *(Claim(page, PAPER_CLAIMS[0], PAPER_CLAIMS[1]) for page in ("README.md", "docs/index.md")),
    Claim(
        "README.md",
        r"`mnist-rce/2` \(the default, (\S+) clean accuracy",
        lambda: (f"{100 * rce().clean.accuracy:.1f}%",),
    ),
    Claim(
        "README.md",
        r"`fashion-mnist-rce/3` \((\S+) on Fashion-MNIST\)",
        lambda: (f"{100 * rce('fashion-mnist').clean.accuracy:.1f}%",),
    ),
    Claim(
        "README.md",
        r"RCE/CE epoch-time ratio of (\d+\.\d+)",
        lambda: (f"{bench('train_rce_vs_ce')['figures']['ratio']:.2f}",),  # type: ignore[index]
    ),
    Claim(
        "docs/index.md",
        r"\(C&W-L2, JSMA\) \| rejects (\S+) of",
        lambda: (span([detected("cw-l2"), detected("jsma")]),),
    ),
    Claim(
        "docs/index.md",
        r"\(FGSM, BIM\) \| rejects (\S+);",
        lambda: (span([detected("fgsm"), detected("bim")]),),
    ),
    Claim(
        "docs/index.md",
        r"\(PGD, (\d+) steps\) \| rejects (\S+): (\S+) of digits",
        lambda: (
            str(rce().attacks["pgd"].params["steps"]),
            span([detected("pgd")]),
            span([undetected("pgd")]),
        ),
    ),
    Claim(
        "docs/index.md",
        r"\(C&W-wb, adaptive PGD\) \| rejects (\S+): \*\*(\S+) of digits end accepted",
        lambda: (
            span([detected("cw-wb"), detected("pgd-adaptive")]),
            span([undetected("cw-wb"), undetected("pgd-adaptive")]),
        ),
    ),
]


def text(page: str) -> str:
    return " ".join((ROOT / page).read_text().split())


@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{c.page}:{c.pattern[:40]}" for c in CLAIMS])
def test_the_page_states_the_figure_of_the_evidence(claim: Claim) -> None:
    match = re.search(claim.pattern, text(claim.page))
    assert match is not None, f"{claim.page} no longer says /{claim.pattern}/: update the claim"
    assert match.groups() == claim.figures(), claim.pattern
