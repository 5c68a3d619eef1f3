#!/usr/bin/env bash
# Train the tiny Mimi codec for about an hour on CPU on speech from many espeak-ng voices, evaluating on
# held-out voices at the start and at the end.
#
#   bash recipes/train-tiny-codec.sh [WORK_DIR] [MAX_STEPS]        (defaults: runs/tiny-codec, 3000)
#
# Re-running resumes the run where it stopped. On a GPU add `--device cuda`; with several processes use
# `torchrun --nproc-per-node N -m openmoshi train codec ...` (the batch is global).
set -euo pipefail
WORK=${1:-runs/tiny-codec}
STEPS=${2:-3000}
DATA=$WORK/data
mkdir -p "$DATA/train" "$DATA/heldout"

SENTENCES=(
  "The quick brown fox jumps over the lazy dog."
  "Please call Stella and ask her to bring these things with her from the store."
  "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob."
  "We also need a small plastic snake and a big toy frog for the kids."
  "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station."
  "When the sunlight strikes raindrops in the air, they act as a prism and form a rainbow."
  "The rainbow is a division of white light into many beautiful colors."
  "These take the shape of a long round arch, with its path high above, and its two ends apparently beyond the horizon."
  "There is, according to legend, a boiling pot of gold at one end."
  "People look, but no one ever finds it."
  "How much wood would a woodchuck chuck if a woodchuck could chuck wood?"
  "I would like a cup of coffee with milk and no sugar, thank you very much."
  "The meeting has been moved to half past three on Thursday afternoon."
  "Numbers like seventeen, forty two and nine hundred are easy to say but hard to hear."
  "Could you speak a little more slowly? The connection is not very good."
  "It was a bright cold day in April, and the clocks were striking thirteen."
)
TRAIN_VOICES=(en-us en-gb en-us+m1 en-us+m2 en-us+m3 en-us+f1 en-us+f2 en-gb+m4 en-gb+f3 en-gb-x-rp
              en-gb-scotland en-029 fr de es it en-us+m5 en-gb+f4)
HELDOUT_VOICES=(en-us+m7 en-gb+f5 en-gb-x-gbclan nl)

synth() {  # voice, sentence index, output file
  local raw="$3.raw.wav"
  espeak-ng -v "$1" -s $((140 + RANDOM % 40)) -w "$raw" "${SENTENCES[$2]}"
  mv "$raw" "$3"
}
if [ ! -f "$DATA/.done" ]; then
  for v in "${TRAIN_VOICES[@]}"; do
    for i in "${!SENTENCES[@]}"; do synth "$v" "$i" "$DATA/train/${v//+/_}_$i.wav"; done
  done
  for v in "${HELDOUT_VOICES[@]}"; do
    for i in 0 3 6 9 12; do synth "$v" "$i" "$DATA/heldout/${v//+/_}_$i.wav"; done
  done
  touch "$DATA/.done"
fi

RUN=$WORK/run
TRAIN=(python -m openmoshi train codec --preset tiny --data "$DATA/train" --eval-data "$DATA/heldout"
       --out "$RUN" --batch-size 8 --segment-seconds 1.0 --checkpoint-every 250 --eval-every 250)
# Start: one step, then the held-out evaluation of that model.
"${TRAIN[@]}" --max-steps 1
python -m openmoshi eval codec --checkpoint "$RUN/model" "$DATA/heldout" --json > "$WORK/eval-start.json"
# The run itself (resumes from step 1), then the same evaluation.
"${TRAIN[@]}" --max-steps "$STEPS"
python -m openmoshi eval codec --checkpoint "$RUN/model" "$DATA/heldout" --json > "$WORK/eval-end.json"
python -m openmoshi plot "$RUN"
echo "start: $WORK/eval-start.json  end: $WORK/eval-end.json  curves: $RUN/plots/  samples: $RUN/samples/"
