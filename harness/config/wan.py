"""Settings of a link between facilities, by name: a topology's `links:` use them as
`preset:`, a fault schedule as a fault that sets them for a while."""

from __future__ import annotations

#: one-way latency and jitter (seconds) and bandwidth (bits/s) of typical links
WAN_PRESETS: dict[str, dict[str, float]] = {
    "lan": {"latency_s": 0.0005, "jitter_s": 0.0, "bandwidth_bps": 1e9},
    "wan-10ms-1gbit": {"latency_s": 0.010, "jitter_s": 0.001, "bandwidth_bps": 1e9},
    "wan-30ms-100mbit": {"latency_s": 0.030, "jitter_s": 0.003, "bandwidth_bps": 100e6},
    "wan-80ms-20mbit": {"latency_s": 0.080, "jitter_s": 0.010, "bandwidth_bps": 20e6},
    "satellite-600ms-5mbit": {"latency_s": 0.600, "jitter_s": 0.050, "bandwidth_bps": 5e6},
}
#: link latency and jitter above a minute would only make every DICOM timeout fire
MAX_LINK_MS = 60_000
MAX_LINK_MBIT = 100_000
