"""loadtests/ab.py's arithmetic: ratios are taken per round (both sides of a ratio ran in the same
round) and then the median over rounds, so a round on a busier machine does not skew them."""

from __future__ import annotations

import argparse
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT))
from loadtests import ab


def test_report_takes_per_round_ratios_against_nginx_and_the_first_build() -> None:
    samples = {
        "nginx": [(100.0, 40.0), (50.0, 20.0), (100.0, 40.0)],  # round 2 ran on a busy machine
        "old": [(50.0, 20.0), (25.0, 10.0), (50.0, 20.0)],
        "new": [(60.0, 22.0), (30.0, 11.0), (60.0, 22.0)],
    }
    text = ab.report(samples, argparse.Namespace(rounds=3, duration=4.0, no_access_log=False))
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert rows["old"] == ["50", "20", "0.50x", "0.50x", "1.00x"]
    assert rows["new"] == ["60", "22", "0.60x", "0.55x", "1.10x"]
    assert "access log on" in text
