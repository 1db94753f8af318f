"""mcckd-demo-data OUT_DIR: the demo's data and tokenizer, made here with no downloads.

    mcckd-demo-data demo_data --train 3000 --dev 200 --test 500 --seed 0

writes OUT_DIR/train.json (MCC-KD format, several teacher-style rationales per question, some
wrong: the input of `mcckd-prepare ... --task gsm8k`), OUT_DIR/dev.json and OUT_DIR/test.json
(one reference rationale each; questions disjoint in arithmetic from train and from each other)
and OUT_DIR/tokenizer/ (Hugging Face format). Everything is built in a temporary folder inside
OUT_DIR and renamed into place, so a failed run leaves what was there before.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence

from mcckd_jax.cli import process
from mcckd_jax.demo import dataset, problems, stories, tokenizer

TOKENIZER_FOLDER = "tokenizer"


def _parser() -> argparse.ArgumentParser:
    defaults = dataset.DemoDataConfig()
    parser = argparse.ArgumentParser(
        prog="mcckd-demo-data", description="Write the demo's arithmetic word problems (train "
        "with multiple teacher-style rationales, dev, test) and a tokenizer trained on them.")
    parser.add_argument("out_dir", help="folder to write train.json, dev.json, test.json and "
                        "tokenizer/ into")
    for split in dataset.SPLITS:
        parser.add_argument(f"--{split}", type=int, default=getattr(defaults, split),
                            help=f"{split} questions")
    parser.add_argument("--rationales_per_question", type=int,
                        default=defaults.rationales_per_question,
                        help="teacher draws per training question (repeats kept)")
    parser.add_argument("--wrong_share", type=float, default=defaults.wrong_share,
                        help="probability that a teacher draw has a wrong answer")
    parser.add_argument("--vocab_size", type=int, default=tokenizer.DEFAULT_VOCAB_SIZE,
                        help="tokenizer vocabulary, special tokens included")
    parser.add_argument("--whole_numbers", action="store_true",
                        help="let the tokenizer make a number one token (default: one token "
                        "per digit); a tiny student learns the arithmetic much faster")
    parser.add_argument("--kinds", default="",
                        help="comma-separated story kinds to use (default all: "
                        f"{','.join(sorted(stories.KINDS))}); fewer kinds make an easier task")
    parser.add_argument("--max_quantity", type=int, default=defaults.max_quantity,
                        help="largest number in any question or rationale (at most "
                        f"{problems.MAX_QUANTITY}); smaller numbers make an easier task")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    return parser


def _move_into_place(staging: pathlib.Path, out_dir: pathlib.Path, names: Sequence[str]) -> None:
    """Renames each staged file or folder over its destination (a folder's old copy is moved
    into the staging area first, since a rename cannot replace a non-empty folder)."""
    for name in names:
        target = out_dir / name
        if (staging / name).is_dir() and target.exists():
            os.replace(target, staging / f"{name}.old")
        os.replace(staging / name, target)


def _summary(out_dir: pathlib.Path, stats: dict, lengths: list[int], vocab: int) -> str:
    questions = stats["questions"]
    per_question = stats["rationales"] / max(questions["train"], 1)
    kinds = ", ".join(f"{kind} {count}" for kind, count in stats["kinds"].items())
    return (f"Wrote {questions['train']} training questions to {out_dir / 'train.json'} with "
            f"{stats['rationales']} teacher-style rationales ({per_question:g} per question, "
            f"{stats['wrong'] / max(stats['rationales'], 1):.1%} wrong, "
            f"{stats['exact_duplicates']} exact repeats, {stats['mean_distinct_correct']:.2f} "
            f"distinct correct ones per question on average), {questions['dev']} dev and "
            f"{questions['test']} test questions (arithmetic disjoint from train and from each "
            f"other; story kinds over all splits: {kinds}; answers up to {stats['max_answer']}), "
            f"and a {vocab}-token tokenizer to {out_dir / TOKENIZER_FOLDER} (rationales: "
            f"{statistics.fmean(lengths) if lengths else 0:.1f} tokens on average, at most "
            f"{max(lengths, default=0)}). Next: mcckd-prepare {out_dir / 'train.json'} --task "
            f"{problems.DEMO_TASK} --output {out_dir / 'train_prepared.jsonl'}")


def write_demo_data(out_dir: str | os.PathLike, config: dataset.DemoDataConfig,
                    vocab_size: int = tokenizer.DEFAULT_VOCAB_SIZE, *,
                    whole_numbers: bool = False) -> str:
    """Writes the demo files into `out_dir` (module docstring); returns the summary paragraph."""
    out_dir = pathlib.Path(out_dir)
    splits = dataset.draw_splits(config)
    train_rows, drafts = dataset.train_records(splits["train"], config)
    rows = {"train": train_rows, "dev": dataset.eval_records(splits["dev"]),
            "test": dataset.eval_records(splits["test"])}
    trained = tokenizer.train_tokenizer(tokenizer.corpus(train_rows), vocab_size,
                                        whole_numbers=whole_numbers)
    texts = [r.text for drawn in drafts for r in drawn]
    lengths = [len(e.ids) for e in trained.encode_batch(texts, add_special_tokens=False)]
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=out_dir, prefix=".mcckd-demo-data-"))
    try:
        for split, split_rows in rows.items():
            (staging / f"{split}.json").write_text(dataset.json_list(split_rows),
                                                   encoding="utf-8")
        tokenizer.save_pretrained(trained, staging / TOKENIZER_FOLDER)
        _move_into_place(staging, out_dir, [f"{s}.json" for s in rows] + [TOKENIZER_FOLDER])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _summary(out_dir, dataset.statistics(splits, drafts), lengths,
                    trained.get_vocab_size())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    process.go_offline()
    try:
        config = dataset.DemoDataConfig(
            train=args.train, dev=args.dev, test=args.test,
            rationales_per_question=args.rationales_per_question, wrong_share=args.wrong_share,
            seed=args.seed, kinds=tuple(k for k in args.kinds.split(",") if k),
            max_quantity=args.max_quantity)
        summary = write_demo_data(args.out_dir, config, args.vocab_size,
                                  whole_numbers=args.whole_numbers)
    except (ValueError, OSError) as error:
        print(f"mcckd-demo-data: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
