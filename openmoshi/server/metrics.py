"""Server metrics, exposed in Prometheus' text format at /metrics."""

from __future__ import annotations

import collections
import typing as tp
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Gauge:
    """One gauge family: name (after `openmoshi_`), help text, and its (labels, value) samples."""

    name: str
    help: str
    values: list[tuple[dict[str, str], float]]


@dataclass
class Metrics:
    sessions_started: int = 0
    sessions_rejected: int = 0
    sessions_sent_elsewhere: int = 0  # upgrades answered 503 for a balancer to retry on another backend
    steps: int = 0
    steps_late: int = 0  # steps slower than real time (80 ms)
    frames_dropped: int = 0  # user frames dropped from sessions that fell too far behind
    protocol_errors: int = 0
    steps_failed: int = 0
    frames_in: int = 0
    step_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))

    def record_step(self, seconds: float, sessions: int) -> None:
        self.steps += 1
        self.frames_in += sessions
        self.step_times.append(seconds)

    def percentiles(self) -> dict[str, float]:
        if not self.step_times:
            return {}
        values = np.percentile(np.fromiter(self.step_times, float), [50, 90, 99])
        return {"0.5": float(values[0]), "0.9": float(values[1]), "0.99": float(values[2])}

    def real_time_factor(self, frame_s: float, last: int = 50) -> float:
        """Mean duration of the last `last` steps over the frame's duration (80 ms): above 1, not real time."""
        if not self.step_times:
            return 0.0
        recent = list(self.step_times)[-last:]
        return sum(recent) / len(recent) / frame_s

    def prometheus(self, active_sessions: int, max_sessions: int, dropped_live: int = 0,
                   gauges: tp.Sequence[Gauge] = ()) -> str:
        lines = [
            "# HELP openmoshi_sessions_active Conversations holding a batch slot.",
            "# TYPE openmoshi_sessions_active gauge",
            f"openmoshi_sessions_active {active_sessions}",
            "# HELP openmoshi_sessions_max Batch slots (--max-sessions).",
            "# TYPE openmoshi_sessions_max gauge",
            f"openmoshi_sessions_max {max_sessions}",
        ]
        counters = {
            "sessions_started_total": (self.sessions_started, "Conversations accepted."),
            "sessions_rejected_total": (self.sessions_rejected, "Conversations refused because all slots were busy."),
            "sessions_sent_elsewhere_total": (self.sessions_sent_elsewhere, (
                "Upgrades answered with HTTP 503 so the load balancer tries another backend (full or warming).")),
            "steps_total": (self.steps, "Batched model steps."),
            "steps_late_total": (self.steps_late, "Steps slower than real time (80 ms)."),
            "frames_total": (self.frames_in, "User frames processed."),
            "frames_dropped_total": (self.frames_dropped + dropped_live,
                                     "User frames dropped because a session fell too far behind."),
            "protocol_errors_total": (self.protocol_errors, "Malformed client messages."),
            "steps_failed_total": (self.steps_failed, "Model steps that raised an error."),
        }
        for name, (value, text) in counters.items():
            lines += [f"# HELP openmoshi_{name} {text}", f"# TYPE openmoshi_{name} counter",
                      f"openmoshi_{name} {value}"]
        lines += ["# HELP openmoshi_step_seconds Duration of a batched model step.",
                  "# TYPE openmoshi_step_seconds summary"]
        for q, value in self.percentiles().items():
            lines.append(f'openmoshi_step_seconds{{quantile="{q}"}} {value:.6f}')
        lines.append(f"openmoshi_step_seconds_count {len(self.step_times)}")
        lines.append(f"openmoshi_step_seconds_sum {sum(self.step_times):.6f}")
        for gauge in gauges:
            lines += [f"# HELP openmoshi_{gauge.name} {gauge.help}", f"# TYPE openmoshi_{gauge.name} gauge"]
            for labels, value in gauge.values:
                label = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"openmoshi_{gauge.name}{{{label}}} {value:g}" if label
                             else f"openmoshi_{gauge.name} {value:g}")
        return "\n".join(lines) + "\n"
