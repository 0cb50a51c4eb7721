"""MPOP, OPF and MPOE side by side on the bundled pydoc-topics task (tiny BERT-like model, CPU-sized;
the runs are ``examples/mpo_methods.py``'s).

All three runs share one encoded task and one initialization seed, so every row is compared with
the same dense full fine-tuning baseline (``acc / dense`` and ``params / dense`` are ratios to it).
Accuracies are measured on the dev split; nothing here is a model number.

    python benchmarks/methods_demo.py --steps 300 --output results/methods_demo.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(os.path.dirname(_HERE), "examples")]
from _common import format_table, write_json  # noqa: E402
from mpo_methods import add_model_options, model_sizes, prepare_task, run_mpoe, run_mpop, run_opf  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of every run (default %(default)s)")
    parser.add_argument("--aux-steps", type=int, default=150, help="MPOP auxiliary-only steps (default %(default)s)")
    parser.add_argument("--budget", type=float, default=0.3, help="MPOP budget, fraction of the encoder matrices (default %(default)s)")
    parser.add_argument("--output", default="results/methods_demo.json", help="default %(default)s")
    add_model_options(parser)
    args = parser.parse_args(argv)
    sizes = model_sizes(args)
    data = prepare_task(max_seq_len=args.max_seq_len, seed=args.seed)
    runs, timings = {}, {}
    for name, fn in (
        ("mpop", lambda: run_mpop(data, args.steps, args.aux_steps, args.budget, seed=args.seed, **sizes)),
        ("opf", lambda: run_opf(data, args.steps, k=0.5, dynamic_every=max(1, args.steps // 4), seed=args.seed, **sizes)),
        ("mpoe", lambda: run_mpoe(data, args.steps, num_experts=4, seed=args.seed, **sizes)),
    ):
        start = time.perf_counter()
        runs[name] = fn()
        timings[name] = time.perf_counter() - start
    dense_acc = runs["mpop"]["accuracy"]["full_finetune"]
    dense_params = runs["mpop"]["params"]["dense_model"]
    rows = [
        dict(run="dense full fine-tune", acc=dense_acc, params=dense_params, trainable=dense_params),
        dict(run="MPOP truncated", acc=runs["mpop"]["accuracy"]["truncated"], params=runs["mpop"]["params"]["compressed_model"], trainable=0),
        dict(run="MPOP auxiliary-only", acc=runs["mpop"]["accuracy"]["auxiliary_finetune"],
             params=runs["mpop"]["params"]["compressed_model"], trainable=runs["mpop"]["params"]["trainable_auxiliary_finetune"]),
        dict(run="OPF dense (same init)", acc=runs["opf"]["accuracy"]["dense_finetune"], params=runs["opf"]["params"]["dense_model"],
             trainable=runs["opf"]["params"]["dense_model"]),
        dict(run="OPF merged", acc=runs["opf"]["accuracy"]["opf_merged"], params=runs["opf"]["params"]["opf_merged"],
             trainable=runs["opf"]["params"]["opf_training"]),
        dict(run="MPOE (4 experts)", acc=runs["mpoe"]["accuracy"]["mpoe"], params=runs["mpoe"]["params"]["mpoe_model"],
             trainable=runs["mpoe"]["params"]["mpoe_model"]),
        dict(run="plain MoE (count only)", acc="", params=runs["mpoe"]["params"]["plain_moe_model"], trainable=""),
    ]
    for r in rows:
        if isinstance(r["acc"], float):
            r["acc / dense"] = r["acc"] / dense_acc
        r["params / dense"] = r["params"] / dense_params
    print(f"pydoc-topics dev accuracy, majority class {data.majority['accuracy']:.3f}; {args.steps} steps per run")
    print(format_table(rows, ["run", "acc", "acc / dense", "params", "params / dense", "trainable"]))
    print(f"OPF merge: largest dev-logit change {runs['opf']['merge_max_abs_logit_diff']:.2e}; "
          f"MPOE dev expert load {[[round(x, 3) for x in layer] for layer in runs['mpoe']['dev_expert_load']]}")
    payload = {"args": vars(args), "rows": rows, "runs": runs, "seconds": timings}
    write_json(args.output, payload)
    print(f"written to {args.output}")
    return payload


if __name__ == "__main__":
    main()
