"""Dialogue data in moshi-finetune's format: synthetic conversations, augmentation, alignment, statistics.

Layout on disk (Kyutai's moshi-finetune contract): a JSONL manifest of `{"path", "duration"}` lines, each path a
stereo 24 kHz wav (channel 0 = Moshi, channel 1 = the user) with `NAME.json` beside it holding
`{"alignments": [[word, [start_s, end_s], speaker], ...]}`.
"""
