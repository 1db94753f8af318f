"""mcckd-prepare: raw teacher rationales -> prepared JSONL + report.

    mcckd-prepare train_multicot.json --task svamp --num_rationales 4 --output svamp.jsonl

Bad input (malformed JSON, bytes that are not UTF-8, missing or mistyped fields, empty
rationale lists, labels that are not answers of the task, an input file without records, an
unknown task) ends the run with one line on stderr naming the file, the record and the field,
exit status 2, and nothing written; so does an output or report that cannot be written (the
two are written together or not at all). With --skip_bad_records bad records are skipped and
counted in the report. Questions repeated with the same label are merged; repeated with
different labels they are kept apart; both are counted in the one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mcckd_jax.cli import process
from mcckd_jax.data import answers, prepare, records, selection

# The report's counts printed as one JSON line on success.
SUMMARY_KEYS = ("questions_in", "duplicate_questions_merged", "questions_with_conflicting_labels",
                "questions_out", "rationales_in", "rationales_out", "bad_records_skipped")


def _parser() -> argparse.ArgumentParser:
    defaults = selection.SelectionConfig()
    parser = argparse.ArgumentParser(
        prog="mcckd-prepare", description="Filter, deduplicate and select teacher rationales "
        "(MCC-KD), and write prepared JSONL plus a report.")
    parser.add_argument("inputs", nargs="+", help="MCC-KD .json, GSM8K or prepared .jsonl, "
                        ".parquet or a saved `datasets` directory")
    parser.add_argument("--task", required=True, help=f"one of {', '.join(answers.TASKS)}")
    parser.add_argument("--output", required=True, help="prepared JSONL to write")
    parser.add_argument("--report", default=None,
                        help="report JSON to write (default: <output>.report.json)")
    parser.add_argument("--num_rationales", type=int, default=defaults.num_rationales,
                        help="K: rationales kept per question")
    parser.add_argument("--ngram", type=int, default=defaults.ngram,
                        help="n of the word n-grams for Jaccard similarity")
    parser.add_argument("--policy", choices=selection.POLICIES, default=defaults.policy,
                        help="how the K rationales are chosen")
    parser.add_argument("--near_duplicate_threshold", type=float,
                        default=defaults.near_duplicate_threshold,
                        help="Jaccard at or above which two rationales are duplicates")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--answer_template", default=prepare.DEFAULT_ANSWER_TEMPLATE,
                        help="final sentence every kept rationale ends with ({answer})")
    parser.add_argument("--no_answer_sentence", action="store_true",
                        help="leave rationale endings as written")
    parser.add_argument("--skip_bad_records", action="store_true",
                        help="skip bad input records and count them in the report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    process.go_offline()
    try:
        config = prepare.PrepareConfig(
            task=args.task,
            selection=selection.SelectionConfig(
                num_rationales=args.num_rationales, ngram=args.ngram, policy=args.policy,
                near_duplicate_threshold=args.near_duplicate_threshold, seed=args.seed),
            answer_template=None if args.no_answer_sentence else args.answer_template,
            skip_bad_records=args.skip_bad_records)
        report = prepare.prepare_files(args.inputs, args.output, config, report_path=args.report)
    except (records.RecordError, ValueError, OSError) as error:
        print(f"mcckd-prepare: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    summary = {key: report[key] for key in SUMMARY_KEYS}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
