"""Teacher rationales for MCC-KD (`mcckd-teacher`): API and local teachers, prompts, the
durable sample cache, and the run that turns a question file into multi-rationale data."""
