"""EANN: separately trained anytime networks of growing cost, run in order, emitting an output
only when it improves on the last one (SPEC section 3).

    from pipeline.eann import EANN
    eann = EANN.load("runs/eann")            # written by `python -m pipeline assemble`
    out = eann.predict(x, budget_macs=5e6)
"""

from pipeline.eann.model import EANN, AnytimeOutput
from pipeline.eann.schedule import ScheduleEntry, build_schedule, cost_ratios

__all__ = ["EANN", "AnytimeOutput", "ScheduleEntry", "build_schedule", "cost_ratios"]
