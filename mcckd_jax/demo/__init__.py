"""The demo's own data: arithmetic word problems with teacher-style rationales, and a tokenizer.

A newcomer's first run needs no downloads: `mcckd-demo-data` writes multi-rationale training
data, dev and test questions, and a small tokenizer trained on them. `problems` holds the
arithmetic and the rendering of rationales, `stories` the story kinds, `dataset` the disjoint
splits and the files, `tokenizer` the tokenizer.
"""
