"""Statistics of a dialogue data set (moshi-finetune format): hours, dialogues, voices, words per minute, the
share of text-stream frames that hold padding, and turn-taking as in the Moshi paper's Table 9 (IPU, pause,
gap, overlap: events per minute and cumulated seconds per minute, as Table 9, then mean and median duration)
per channel, with PNG histograms. `--reference FILE` prints a reference's per-minute figures beside the
data set's, and the mean duration they imply (seconds per minute / events per minute: what a synth
`--turn-taking` distribution's mean is compared with); a JSON table, see openmoshi.data.stats.read_reference;
none is built in.

  openmoshi data stats synth/                 # a folder of manifests (or of wav + json)
  openmoshi data stats synth/train.jsonl --json --plots plots/
  openmoshi data stats synth/ --reference fisher.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.stats import EVENTS, IPU_SILENCE, dataset_stats, plot_histograms, read_reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="data set folder (with *.jsonl manifests) or one manifest")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--plots", type=Path, default=None, help="write histograms (PNG) into this folder")
    parser.add_argument("--ipu-silence", type=float, default=IPU_SILENCE,
                        help="silence (s) that separates two IPUs of a speaker (Table 9 uses 0.2)")
    parser.add_argument("--reference", type=Path, default=None,
                        help='JSON table printed beside the data set\'s turn-taking: {"name": ..., "events": '
                             '{"gap": {"per_minute": x, "seconds_per_minute": y}, ...}}')


def run(args: argparse.Namespace) -> int:
    reference = read_reference(args.reference) if args.reference is not None else None
    stats = dataset_stats(args.data, args.ipu_silence)
    summary = stats.summary()
    if reference is not None:
        summary["reference"] = reference
    if args.plots is not None:
        summary["plots"] = [str(p) for p in plot_histograms(stats, args.plots)]
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{summary['dialogues']} dialogues, {summary['hours']:.3f} hours"
          + (f" (splits: {summary['splits']})" if summary["splits"] else ""))
    if summary["voices"]:
        print("voices: " + ", ".join(f"{role} {n}" for role, n in summary["voices"].items()))
    for speaker, wpm in summary["words_per_minute"].items():
        print(f"{speaker}: {summary['words'][speaker]} words, {wpm:.1f} per minute of dialogue, "
              f"{summary['words_per_minute_of_speech'][speaker]:.1f} per minute of own speech")
    if summary["text_pad_fraction"] is not None:
        print(f"text stream (SPEAKER_MAIN, 12.5 Hz): {100 * summary['text_pad_fraction']:.1f} % of frames are padding")
    speakers = [s for s in next(iter(summary["turn_taking"].values()))]
    ref = reference["events"] if reference else {}
    head = f"{'event':8s} {'speaker':14s} {'count':>7s} {'/min':>7s} {'s/min':>7s} {'mean s':>7s} {'median':>7s}"
    if reference:
        print(f"\nreference: {reference['name']} (both speakers)")
        head += f" {'ref /min':>9s} {'ref s/min':>9s} {'ref mean':>9s}"  # mean = s/min / (/min)
    print(("" if reference else "\n") + head)
    for kind in EVENTS:
        for who in speakers:
            row = summary["turn_taking"][kind][who]
            mean = f"{row['mean']:.3f}" if row["mean"] is not None else "-"
            median = f"{row['median']:.3f}" if row["median"] is not None else "-"
            line = (f"{kind:8s} {who:14s} {row['count']:7d} {row['per_minute']:7.2f} "
                    f"{row['seconds_per_minute']:7.2f} {mean:>7s} {median:>7s}")
            if reference and who == "all":
                r = ref.get(kind, {})
                line += "".join(f" {r[k]:9.2f}" if k in r else f" {'-':>9s}"
                                for k in ("per_minute", "seconds_per_minute"))
                both = r.get("per_minute") and "seconds_per_minute" in r
                line += f" {r['seconds_per_minute'] / r['per_minute']:9.3f}" if both else f" {'-':>9s}"
            print(line)
    for p in summary.get("plots", []):
        print(f"wrote {p}")
    return 0
