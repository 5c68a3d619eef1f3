"""Training data: text corpora, aligned speech, stereo dialogues, Mimi codes, crops and the text stream."""
