"""Server metrics, exposed in Prometheus' text format at /metrics."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Metrics:
    sessions_started: int = 0
    sessions_rejected: int = 0
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

    def prometheus(self, active_sessions: int, max_sessions: int, dropped_live: int = 0) -> str:
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
        return "\n".join(lines) + "\n"
