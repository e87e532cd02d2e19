"""The `lakelens` command. The only module that parses argv.

Each command's arguments are defined by a small `add_<command>(subparsers)`; its handler
`_<command>(args)` builds the job's config, runs the job (imported lazily, so `--help`
stays fast) and prints one summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import threading
from collections.abc import Sequence

from models.errors import LakelensError
from models.registry import DEFAULT_ARCHS, DEFAULT_TASKS, LOSSES, TASKS

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _task_map(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        task, sep, name = value.partition("=")
        if not sep or not name:
            raise LakelensError(f"{flag} {value!r}: expected TASK=VALUE with TASK one of "
                                f"{', '.join(TASKS)}")
        if task not in TASKS:
            raise LakelensError(f"{flag} {value!r}: unknown task {task!r}; choose from "
                                f"{', '.join(TASKS)}")
        out[task] = name
    return out


def _weights(values: list[str] | None, tasks: Sequence[str]) -> dict[str, str]:
    """`--weights SPEC` (every task) and `--weights TASK=SPEC` (one task), later wins."""
    out: dict[str, str] = {}
    for value in values or []:
        task, sep, spec = value.partition("=")
        if sep and task in TASKS:
            out[task] = spec
        elif sep and task.isidentifier() and not any(c in value for c in "/\\."):
            raise LakelensError(f"--weights {value!r}: unknown task {task!r}; choose from "
                                f"{', '.join(TASKS)}")
        else:
            out.update({t: value for t in tasks})
    return out


def _arch_help() -> str:
    """The arch choices per task, for --help only (listing them imports torchvision)."""
    if not {"-h", "--help"} & set(sys.argv[1:]):
        return "see --help"
    from models.registry import arch_choices

    return "; ".join(f"{t}: {', '.join(arch_choices(t))} (default {DEFAULT_ARCHS[t]})"
                     for t in TASKS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lakelens", description="Annotate and search image lakes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (add_annotate, add_results, add_migrate, add_forget, add_index, add_query, add_serve,
                add_eval, add_export, add_render, add_synth, add_train, add_demo, add_submit, add_jobs,
                add_dedup):
        add(sub)
    return parser


def add_annotate(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "annotate", help="detect, segment, pose and embed images into the lake table",
        description="Annotate images with Ray Data into DIR's Delta tables (DIR/log, DIR/current): one "
                    "current row per image, a result or an error. Incremental on an existing "
                    "table: only new and changed images (and transient errors of earlier runs) "
                    "are annotated; rerunning a crashed run resumes it. One run per DIR at a "
                    "time; a run record per run in DIR/runs.")
    a.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="directory (recursive), glob, manifest (.txt/.parquet, S3 Inventory) or URI")
    a.add_argument("--out", required=True, metavar="DIR", help="output directory or URI")
    a.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated subset of {','.join(TASKS)} (default: "
                        f"{','.join(DEFAULT_TASKS)}; semantic when asked)")
    a.add_argument("--weights", action="append", metavar="SPEC|TASK=SPEC",
                   help="default (torchvision's published weights), random (seeded), or a "
                        "checkpoint path; for every task, or TASK=SPEC for one (repeatable)")
    a.add_argument("--arch", action="append", metavar="TASK=NAME",
                   help="architecture per task (repeatable). " + _arch_help())
    a.add_argument("--image-size", type=int, metavar="N",
                   help="shorter side the detectors see (default: each model's own)")
    a.add_argument("--score-threshold", type=float, default=0.5, metavar="F",
                   help="drop detections below this score (default 0.5)")
    a.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="images per model batch (default 8)")
    a.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    a.add_argument("--num-cpus", type=int, metavar="N",
                   help="CPUs for a local Ray (default: all of this machine's)")
    _add_annotate_run(a)


def _add_annotate_run(a: argparse.ArgumentParser) -> None:
    """annotate's flags for what one run does: how much, how big, what else."""
    a.add_argument("--limit", type=int, metavar="N",
                   help="annotate at most N of the images that need it (the rest next run)")
    a.add_argument("--max-pixels", type=int, metavar="N",
                   help="reject images with more pixels than this (default 100000000)")
    a.add_argument("--max-image-mb", type=float, default=64.0, metavar="MB",
                   help="reject image files larger than this, before reading them (default 64 MiB)")
    a.add_argument("--full", action="store_true",
                   help="re-annotate every listed image, not only new and changed ones (the "
                        "old rows stay as history)")
    a.add_argument("--prune", action="store_true",
                   help="close the current rows of images that are no longer listed")
    a.add_argument("--chunk-size", type=int, default=50_000, metavar="N",
                   help="images per table commit at most (default 50000; a commit also lands at "
                        "128 MiB of rows or 5 minutes after the last one)")
    a.add_argument("--max-error-rate", type=float, default=0.5, metavar="F",
                   help="exit non-zero when more than this share of the tried images failed "
                        "(once at least 100 were tried, or all of them failed; default 0.5)")
    a.add_argument("--lease-s", type=float, default=900.0, metavar="S",
                   help="DIR on object storage: the run's lease, renewed every S/3 seconds; a run "
                        "that stops renewing (a paused VM) is taken over after S (default 900)")
    a.add_argument("--max-gpus", type=int, metavar="N",
                   help="on an autoscaling cluster: let the GPU actors (one per GPU) grow to N "
                        "(default: the GPUs the cluster has at start)")
    a.add_argument("--index", metavar="INDEX_DIR",
                   help="bring this similarity index up to date after the run (built if missing)")


def add_results(sub: argparse._SubParsersAction) -> None:
    rs = sub.add_parser(
        "results", help="counts, SQL and upkeep of an annotations table",
        description="Without options: counts of the current view by status, stage and error "
                    "type. --sql runs DuckDB over the current view (the view is named "
                    "'current', also 'results'; 'history' holds every row).")
    rs.add_argument("table", metavar="DIR", help="an annotate --out DIR (local or URI)")
    rs.add_argument("--sql", metavar="QUERY",
                    help="e.g. \"SELECT uri, len(detections) AS n FROM results ORDER BY n DESC LIMIT 5\"")
    rs.add_argument("--history", action="store_true",
                    help="with --out: every row, superseded ones included")
    rs.add_argument("--out", metavar="FILE", help="write the rows (.parquet or .csv) instead of printing")
    rs.add_argument("--compact", action="store_true",
                    help="rebuild due snapshot parts and delete unreferenced files (takes the run lock)")
    rs.add_argument("--retention-hours", type=int, default=168, metavar="H",
                    help="--compact keeps files any version of the last H hours needs (default 168)")


def add_migrate(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("migrate", help="bring a table of an older schema to this lakelens's layout "
                                       "(in place, under the run lock)")
    m.add_argument("out", metavar="DIR", help="an annotate --out DIR (local or URI)")


def add_forget(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("forget", help="right to erasure: tombstone images and remove their bytes "
                                      "(table rows, index vectors) at the next upkeep")
    f.add_argument("out", metavar="DIR", help="an annotate --out DIR (local or URI)")
    which = f.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", metavar="FILE", help="a file naming the images to forget by image_id")
    which.add_argument("--where", metavar="SQL",
                       help="forget the images whose current rows match this SQL condition")
    f.add_argument("--no-upkeep", action="store_true",
                   help="only tombstone now; the bytes go at the next upkeep (the next annotate)")
    f.add_argument("--index", metavar="INDEX_DIR",
                   help="also erase their vectors from this index (rebuilt; earlier versions deleted)")


def add_index(sub: argparse._SubParsersAction) -> None:
    ix = sub.add_parser("index", help="build or update the similarity index")
    ixs = ix.add_subparsers(dest="index_command", required=True, parser_class=_Parser)
    b = ixs.add_parser("build", help="build a FAISS index from results' embeddings")
    b.add_argument("results", metavar="DIR", help="an annotate --out DIR (local or URI)")
    b.add_argument("--out", required=True, metavar="INDEX_DIR")
    b.add_argument("--factory", default="auto",
                   help="auto (chosen from count and dim) or a FAISS factory string, e.g. "
                        "Flat, IVF1024,Flat, IVF4096,PQ64x4fs,Refine(SQ8)")
    b.add_argument("--metric", default="ip", choices=["ip", "l2"],
                   help="inner product (default; embeddings are unit-norm) or L2")
    b.add_argument("--gpu", default="auto", choices=["auto", "on", "off"],
                   help="train and add on the GPU(s) when FAISS sees one (default auto)")
    b.add_argument("--train-sample", type=int, metavar="N",
                   help="vectors sampled to train IVF/PQ (default max(50000, 40 per list))")
    b.add_argument("--memory-gb", type=float, default=16.0, metavar="GB",
                   help="RAM the index may take; auto picks the most accurate code that fits "
                        "(default 16)")
    b.add_argument("--shards", type=int, metavar="N",
                   help="add the vectors in N parallel Ray tasks over one trained quantizer, merged "
                        "into one index (default: one process, or shards of ~2M vectors inside a Ray job)")
    b.add_argument("--address", metavar="ADDR",
                   help="Ray cluster for --shards (default: RAY_ADDRESS, else a local Ray)")
    u = ixs.add_parser("update", help="add the table's changes since the index was built")
    u.add_argument("index", metavar="INDEX_DIR")
    u.add_argument("results", metavar="DIR", help="the annotate --out DIR the index was built from")


def add_query(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("query", help="nearest neighbours from the similarity index")
    q.add_argument("index", metavar="INDEX_DIR")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", metavar="PATH", help="an image file, or a directory of them")
    what.add_argument("--id", metavar="IMAGE_ID", action="append",
                      help="an image_id in the index (repeatable)")
    what.add_argument("--vector", metavar="FILE.npy", help="a [dim] or [n, dim] array")
    q.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    q.add_argument("--json", action="store_true", help="print one JSON array")
    q.add_argument("--weights", metavar="PATH",
                   help="the embedder checkpoint, if it moved since annotate")
    q.add_argument("--max-image-mb", type=float, default=64.0, metavar="MB",
                   help="refuse --image files larger than this (default 64 MiB)")


def add_serve(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="the similarity index as an HTTP service with a web page")
    sv.add_argument("index", metavar="INDEX_DIR")
    sv.add_argument("--table", metavar="DIR",
                    help="the annotate --out DIR for filters and overlays (default: the table "
                         "the index was built from)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; beyond loopback a token is "
                         "required: without one, one is generated and its URL printed)")
    sv.add_argument("--port", type=int, default=8000, help="default 8000")
    sv.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    sv.add_argument("--token-file", metavar="PATH",
                    help="file holding the access token requests must send (or set "
                         "LAKELENS_SERVE_TOKEN); never given on the command line")
    sv.add_argument("--no-auth", action="store_true",
                    help="serve beyond loopback WITHOUT a token (anyone who reaches the port reads "
                         "the lake); default: a token is generated")
    sv.add_argument("--public-url", metavar="URL",
                    help="where people reach the service (e.g. https://... behind a TLS proxy): "
                         "the printed URL uses it, and an https one makes the token cookie Secure")
    sv.add_argument("--reload-interval", type=float, default=10.0, metavar="S",
                    help="seconds between checks for a new index version (0: never)")
    sv.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask (default 1000)")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (default 32)")
    sv.add_argument("--max-request-pixels", type=int, default=100_000_000, metavar="N",
                    help="pixels of one upload request's images together, read from their headers "
                         "before decoding (default 100000000; over it: 413)")
    sv.add_argument("--weights", metavar="PATH",
                    help="the embedder checkpoint, if the index names one that moved")
    sv.add_argument("--ray", action="store_true",
                    help="deploy on Ray Serve (replicas each hold the index; autoscaled)")
    sv.add_argument("--address", help="Ray cluster to deploy on with --ray (default: RAY_ADDRESS "
                                      "or a local Ray)")
    sv.add_argument("--min-replicas", type=int, default=1, help="with --ray (default 1)")
    sv.add_argument("--max-replicas", type=int, default=4, help="with --ray (default 4)")


def add_dedup(sub: argparse._SubParsersAction) -> None:
    dd = sub.add_parser(
        "dedup", help="near-duplicate groups of an annotations table",
        description="Groups the images whose near-duplicate edges (found by every `annotate --index` "
                    "run, in DIR/dedup) reach the threshold: connected components, each named by "
                    "its smallest image_id. Prints a summary; --out writes one row per image in a group.")
    dd.add_argument("table", metavar="DIR", help="an annotate --out DIR (local or URI)")
    dd.add_argument("--threshold", type=float, metavar="S",
                    help="cosine similarity at which two images are duplicates (default: the "
                         "calibrated one, see README)")
    dd.add_argument("--out", metavar="groups.parquet",
                    help="write image_id, uri, group_id, group_size, similarity (to the group's "
                         "representative) per image in a group")


def _dedup(args: argparse.Namespace) -> int:
    from pipelines import dedup

    found = dedup.groups(args.table, dedup.DEFAULT_THRESHOLD if args.threshold is None else args.threshold)
    s = found.summary()
    print(f"near-duplicates in {args.table} at similarity >= {s['threshold']:g}: {s['groups']} groups, "
          f"{s['images_in_groups']} images in groups, largest group {s['largest_group']}")
    if args.out:
        print(f"wrote {dedup.write_groups(found, args.out)} rows to {args.out}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="COCO AP/AR of results against ground truth")
    ev.add_argument("results", metavar="DIR")
    ev.add_argument("--gt", required=True, metavar="annotations.json",
                    help="COCO ground truth; file_name relative to its folder")
    ev.add_argument("--out", metavar="FILE.json", help="default: DIR/eval.json (local DIR)")


def add_export(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export results in another format")
    exs = ex.add_subparsers(dest="format", required=True, parser_class=_Parser)
    co = exs.add_parser("coco", help="COCO predictions (what pycocotools' loadRes reads)")
    co.add_argument("results", metavar="DIR")
    co.add_argument("--out", required=True, metavar="preds.json",
                    help="one file per IoU type (preds.bbox.json, ...) when several tasks")
    co.add_argument("--gt", metavar="annotations.json",
                    help="take image and category ids from this ground truth")
    co.add_argument("--tasks", help="comma-separated subset of detect,segment,pose")


def add_render(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("render", help="PNG overlays of results: a panel per task (boxes, masks, "
                                      "skeletons, semantic classes)")
    r.add_argument("results", metavar="DIR")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    r.add_argument("--min-score", type=float, default=0.5, metavar="S",
                   help="draw detections, instances and poses scoring at least S, in [0, 1] "
                        "(default 0.5)")


def add_synth(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("synth", help="write a synthetic image lake: COCO train/val splits",
                       description="Shapes with exact boxes, masks, keypoints and an identity per "
                                   "image family; OUT_DIR/train and OUT_DIR/val hold images/ and "
                                   "annotations.json, with disjoint families.")
    s.add_argument("out", metavar="OUT_DIR")
    s.add_argument("--images", type=int, default=400, metavar="N", help="train + val (default 400)")
    s.add_argument("--seed", type=int, default=0, metavar="S")
    s.add_argument("--val-fraction", type=float, default=0.25, metavar="F",
                   help="share of families held out for val (default 0.25)")
    s.add_argument("--family-size", type=int, default=4, metavar="K",
                   help="images per family (default 4)")
    s.add_argument("--size", type=int, default=128, metavar="PX", help="image side (default 128)")


def add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train detectors or the embedder with Ray Train")
    ts = t.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    td = ts.add_parser("detector", help="fine-tune Faster/Mask/Keypoint R-CNN on a COCO dataset",
                       description="Reports loss and COCO AP on the val split each epoch; writes the "
                                   "best model to RUN_DIR/model.pt for annotate --weights TASK=PATH.")
    td.add_argument("--task", required=True, choices=["detect", "segment", "pose"])
    te = ts.add_parser("embedder", help="metric learning on images or object crops by identity",
                       description="P x K batches, multi-similarity or contrastive loss; reports "
                                   "Recall@1/2/4/8 on the val split's held-out identities.")
    tsem = ts.add_parser("semantic", help="semantic segmentation (FCN, DeepLabV3, LR-ASPP, U-Net) "
                                          "on COCO data or its label PNGs",
                         description="Instance masks become per-pixel class maps (or the split's "
                                     "label PNGs named by each image's class_map); reports mean IoU, "
                                     "pixel accuracy and frequency-weighted IoU on the val split.")
    for p in (td, te, tsem):
        _add_train_common(p)
    for p in (td, tsem):
        p.add_argument("--batch-size", type=int, default=4, metavar="N",
                       help="images per worker per step (default 4)")
        p.add_argument("--image-size", type=int, metavar="N",
                       help="shorter side the model sees (default: the arch's; semantic trains "
                            "on square crops of that side)")
    _add_train_embedder(te)


def _add_train_common(p: argparse.ArgumentParser) -> None:
    """The flags every `train` kind takes: data, model, DDP workers, schedule, run dir."""
    p.add_argument("--data", required=True, metavar="DIR",
                   help="DIR/train/annotations.json and DIR/val/annotations.json (COCO)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--arch", help="architecture (default: the task's). " + _arch_help())
    p.add_argument("--init", default="default", metavar="SPEC",
                   help="default (torchvision's published weights), random, or a checkpoint")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="DDP workers (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="N")
    p.add_argument("--epochs", type=int, default=10, metavar="E")
    p.add_argument("--lr", type=float, metavar="F",
                   help="AdamW learning rate (default 3e-3 from random init, 1e-4 fine-tuning)")
    p.add_argument("--max-steps-per-epoch", type=int, metavar="N")
    p.add_argument("--loader-workers", type=int, metavar="N",
                   help="DataLoader processes per worker (default: from its CPUs)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="discard the run in RUN_DIR")
    p.add_argument("--max-failures", type=int, default=0, metavar="N",
                   help="restart from the last checkpoint after up to N worker failures")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, metavar="N", help="CPUs for a local Ray")


def _add_train_embedder(te: argparse.ArgumentParser) -> None:
    te.add_argument("--loss", default="multi_similarity", choices=list(LOSSES),
                    help="pytorch-metric-learning loss (default multi_similarity); proxy_anchor "
                         "and arcface learn a proxy per identity, in their own LR group")
    te.add_argument("--p", type=int, default=8, metavar="P", help="identities per batch (default 8)")
    te.add_argument("--k", type=int, default=4, metavar="K", help="examples per identity (default 4)")
    te.add_argument("--dim", type=int, default=128, metavar="D",
                    help="embedding size (a linear projection; 0: the trunk's own)")
    te.add_argument("--unit", default="auto", choices=["auto", "image", "object"],
                    help="learn whole images or object crops (default: images when every "
                         "image has an identity)")


def add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the whole product offline: synth, train, annotate, index, eval",
                       description="Synthesizes a small lake, trains detect/segment/pose and the "
                                   "embedder with Ray Train, annotates the val lake, builds the "
                                   "index, queries it and scores everything. The last line is JSON.")
    d.add_argument("--out", default="demo-out", metavar="DIR")
    d.add_argument("--images", type=int, default=1000, metavar="N",
                   help="synthetic images, a tenth of them (whole families) for val (default 1000)")
    d.add_argument("--workers", type=int, default=2, metavar="N")
    d.add_argument("--gpu", action="store_true")
    d.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke run)")


def add_submit(sub: argparse._SubParsersAction) -> None:
    sb = sub.add_parser(
        "submit", help="run a lakelens command as a job on a Ray cluster (the Jobs API)",
        description="Uploads this lakelens project's code (pipelines/, models/, index/, pyproject.toml, "
                    "cluster.yaml; or all of --working-dir, less .venv, .git, outputs and caches; at "
                    "most 100 MiB) as the job's working_dir, refusing credential-shaped files unless "
                    "named with --allow-file, waits for the job agent (60 s), runs `lakelens "
                    "COMMAND ARGS` on the cluster, streams its logs and exits with its final state "
                    "(0 succeeded, 1 failed, 130 stopped). Reach a remote cluster through `ray "
                    "dashboard cluster.yaml` (then the default address works) or an https proxy.",
        usage="lakelens submit [--address URL] [--no-wait] [options] -- COMMAND [ARGS ...]")
    _jobs_address(sb)
    sb.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sb.add_argument("--working-dir", metavar="DIR",
                    help="upload DIR instead of the lakelens project this command runs from")
    sb.add_argument("--allow-file", action="append", default=[], metavar="PATH",
                    help="let this credential-shaped file go up (relative to the working dir; repeatable)")
    sb.add_argument("--submission-id", metavar="ID", help="the job's id (default: Ray picks one)")
    sb.add_argument("job", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                    help="the lakelens command the job runs, e.g. -- annotate s3://b/lake --out s3://b/out")


def add_jobs(sub: argparse._SubParsersAction) -> None:
    jb = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    jb.add_argument("action", choices=["list", "status", "logs", "stop"])
    jb.add_argument("job_id", nargs="?", metavar="JOB_ID")
    jb.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    _jobs_address(jb)


def _jobs_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="URL",
                   help="the Jobs API (default: RAY_API_SERVER_ADDRESS, an http(s) RAY_ADDRESS, "
                        "else http://127.0.0.1:8265)")
    p.add_argument("--allow-insecure-http", action="store_true",
                   help="allow plain http:// to a host other than this machine (the token travels "
                        "in clear)")


def _annotate(args: argparse.Namespace) -> int:
    from models.decode import DEFAULT_MAX_PIXELS
    from pipelines.annotate.connect import connect
    from pipelines.config import AnnotateConfig

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    cfg = AnnotateConfig(
        sources=tuple(args.sources), out=args.out, tasks=tasks,
        weights=_weights(args.weights, tasks), archs=_task_map(args.arch, "--arch"),
        image_size=args.image_size, score_threshold=args.score_threshold,
        batch_size=args.batch_size, address=args.address, limit=args.limit,
        full=args.full, prune=args.prune, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        max_image_mb=args.max_image_mb,
        chunk_size=args.chunk_size, max_error_rate=args.max_error_rate, index=args.index,
        lease_s=args.lease_s,
        num_cpus=args.num_cpus, max_gpus=args.max_gpus)
    # The job's modules (torch, torchvision: seconds) import while Ray starts.
    loading = threading.Thread(target=importlib.import_module, args=("pipelines.annotate.job",),
                               name="lakelens-import", daemon=True)
    loading.start()
    connect(cfg)
    loading.join()
    from pipelines.annotate import run

    summary = run(cfg)
    print(summary.describe())
    if summary.error_rate_exceeded:
        print(f"lakelens: error: {summary.error_line()}", file=sys.stderr)
        return 1
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipelines.cluster.submit import SubmitConfig, resolve_address, submit

    job = tuple(args.job[1:] if args.job[:1] == ["--"] else args.job)
    cfg = SubmitConfig(args=job, address=resolve_address(args.address), wait=not args.no_wait,
                       working_dir=args.working_dir, allow_insecure_http=args.allow_insecure_http,
                       submission_id=args.submission_id, allow_files=tuple(args.allow_file))
    return submit(cfg)


def _jobs(args: argparse.Namespace) -> int:
    from pipelines.cluster.submit import jobs_command, resolve_address

    return jobs_command(args.action, args.job_id, address=resolve_address(args.address),
                        follow_logs=args.follow, allow_insecure_http=args.allow_insecure_http)


def _results(args: argparse.Namespace) -> int:
    from pipelines.lake import results

    if args.compact:
        from pipelines.lake import upkeep

        done = upkeep.compact(args.table, retention_hours=args.retention_hours)
        print(f"compacted {args.table}: {done['rebuilt']} snapshot parts rebuilt "
              f"({done['rows_rewritten']} rows), {done['vacuumed']} unreferenced files deleted; "
              f"table version {done['version']}")
        return 0
    if args.sql or args.out or args.history:
        if args.out:
            rows = results.write(args.table, args.sql, args.out, history=args.history)
            print(f"wrote {rows} rows to {args.out}")
        else:
            print(results.format_table(results.query(args.table, args.sql, history=args.history,
                                                     limit=results.MAX_PRINT_ROWS + 1)))
        return 0
    print(results.summary(args.table))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from pipelines.lake import upkeep

    print(upkeep.describe(upkeep.migrate(args.out)))
    return 0


def _forget(args: argparse.Namespace) -> int:
    from pipelines.lake import upkeep

    result = upkeep.forget(args.out, ids_file=args.ids, where=args.where, upkeep=not args.no_upkeep)
    print(upkeep.describe(result))
    if args.index:
        from pipelines import indexing

        print(f"index {args.index}: {indexing.describe_update(indexing.update(args.index, args.out))}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from pipelines import indexing

    if args.index_command == "update":
        m = indexing.update(args.index, args.results)
        print(f"updated {args.index}: {indexing.describe_update(m)}")
        return 0
    cfg = indexing.IndexBuildConfig(
        results=args.results, out=args.out, factory=args.factory, metric=args.metric,
        gpu=args.gpu, train_sample=args.train_sample, memory_budget_gb=args.memory_gb,
        shards=args.shards)
    if (args.shards or 0) > 1:
        _join_ray(args.address)
    m = indexing.build(cfg)
    print(f"built {args.out}: {m['count']} vectors of dim {m['dim']}, {m['factory']} "
          f"({m['factory_reason']}); recall@10 vs exact search {m['recall_at_10']:.3f} on "
          f"{m['recall_queries']} held-out queries with {m['search_params'] or 'no tuning'}; "
          f"{m['build_s']:.1f} s on {m['built_on']}")
    return 0


def _join_ray(address: str | None) -> None:
    """Join ADDR (or RAY_ADDRESS); else start a local Ray on loopback with token auth."""
    import logging

    import ray

    from pipelines.cluster.local import start_local_ray

    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            start_local_ray(dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise LakelensError(f"cannot connect to Ray at {address or 'a new local instance'}: {e}") from e


def _query(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from index.store import open_index

    if args.k <= 0:
        raise LakelensError(f"-k must be >= 1, got {args.k}")
    if not args.max_image_mb > 0:
        raise LakelensError(f"--max-image-mb must be > 0, got {args.max_image_mb}")
    idx = open_index(args.index)
    if args.image:
        import os

        from pipelines.lake.sources import list_local_images

        paths = list_local_images(args.image) if os.path.isdir(args.image) else [args.image]
        if not paths:
            raise LakelensError(f"no images in {args.image!r}")
        labels, found = paths, idx.search_images(paths, args.k, weights=args.weights,
                                                 max_image_mb=args.max_image_mb)
    elif args.id:
        labels, found = args.id, idx.search_ids(args.id, args.k)
    else:
        try:
            vectors = np.load(args.vector, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise LakelensError(f"cannot read --vector {args.vector!r}: {e}") from e
        vectors = np.atleast_2d(vectors)
        labels, found = [f"{args.vector}[{i}]" for i in range(len(vectors))], idx.search(vectors, args.k)
    if args.json:
        print(json.dumps(found.as_json()))
        return 0
    for label, hits in zip(labels, found.as_json(), strict=True):
        print(f"query {label}:")
        for h in hits:
            print(f"  {h['rank']:>3}  {h['score']:.4f}  {h['image_id']}  {h['uri']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pipelines.coco import evaluate
    from pipelines.lake.table import save_json

    report = evaluate(args.results, args.gt)
    out = args.out or f"{args.results.rstrip('/')}/eval.json"
    save_json(out, report)
    for iou_type, result in report["tasks"].items():
        print(f"{iou_type}:\n{result['summary']}")
    print(f"{report['images']} images evaluated ({report['unmatched_images']} not in the ground "
          f"truth); metrics written to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipelines.coco import COLUMNS, export

    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else None
    for t in tasks or ():
        if t not in COLUMNS:
            raise LakelensError(f"--tasks: {t!r} has no COCO form; choose from {', '.join(COLUMNS)}")
    for iou_type, path in export(args.results, args.out, gt_path=args.gt, tasks=tasks).items():
        print(f"wrote {iou_type} predictions to {path}")
    return 0


def _render(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise LakelensError(f"--limit must be >= 1, got {args.limit}")
    if not 0.0 <= args.min_score <= 1.0:
        raise LakelensError(f"--min-score must be in [0, 1], got {args.min_score}")
    from pipelines.render import render

    written, failed = render(args.results, args.out, limit=args.limit, min_score=args.min_score)
    print(f"wrote {written} overlays to {args.out}" + (f" ({failed} images unreadable)" if failed else ""))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from pipelines.synth import write_dataset

    if args.family_size < 2:
        raise LakelensError(f"--family-size must be >= 2, got {args.family_size}")
    if not 32 <= args.size <= 2048:
        raise LakelensError(f"--size must be in 32..2048, got {args.size}")
    train, val = write_dataset(args.out, images=args.images, seed=args.seed,
                               val_fraction=args.val_fraction, family_size=args.family_size,
                               width=args.size, height=args.size)
    print(f"wrote {args.images} images: train split {train}, val split {val}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipelines.train import TrainConfig, run

    common = {"data": args.data, "out": args.out, "arch": args.arch, "init": args.init,
              "workers": args.workers, "gpu": args.gpu, "cpus_per_worker": args.cpus_per_worker,
              "epochs": args.epochs, "lr": args.lr, "max_steps_per_epoch": args.max_steps_per_epoch,
              "loader_workers": args.loader_workers, "seed": args.seed, "resume": args.resume,
              "overwrite": args.overwrite, "max_failures": args.max_failures,
              "address": args.address, "num_cpus": args.num_cpus}
    if args.kind in ("detector", "semantic"):
        cfg = TrainConfig(kind=args.kind, task=getattr(args, "task", "semantic"),
                          batch_size=args.batch_size, image_size=args.image_size, **common)
    else:
        cfg = TrainConfig(kind="embedder", task="embed", loss=args.loss, p=args.p, k=args.k,
                          dim=args.dim or None, unit=args.unit, **common)
    print(run(cfg).describe())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipelines.serve import access_token, check_auth_flags, read_token, serve
    from pipelines.serve.engine import Engine, ServeConfig

    cfg = ServeConfig(index=args.index, table=args.table, host=args.host, port=args.port,
                      workers=args.workers, reload_s=args.reload_interval, max_k=args.max_k,
                      max_body_mb=args.max_body_mb, max_request_pixels=args.max_request_pixels,
                      weights=args.weights, public_url=args.public_url)
    token = read_token(args.token_file)
    check_auth_flags(token, no_auth=args.no_auth)
    if args.ray:
        from pipelines.cluster.local import start_local_ray
        from pipelines.serve import ray_app

        if not 1 <= args.min_replicas <= args.max_replicas:
            raise LakelensError(f"need 1 <= --min-replicas <= --max-replicas, got "
                                f"{args.min_replicas} and {args.max_replicas}")
        Engine(dataclasses.replace(cfg, reload_s=0))  # fail here, in one line, on a bad index
        import ray

        if args.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=args.address or os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            start_local_ray(os.cpu_count() or 1)
        print(f"lakelens: serving {args.index} on Ray Serve at http://{cfg.host}:{cfg.port}/ "
              f"({args.min_replicas}-{args.max_replicas} replicas); Ctrl-C stops", file=sys.stderr)
        with access_token(cfg, token, no_auth=args.no_auth) as required:
            ray_app.run(cfg, token=required, min_replicas=args.min_replicas,
                        max_replicas=args.max_replicas)
        return 0
    # a bad index or table is one line here, before anything binds
    engine = Engine(cfg) if cfg.workers == 1 else Engine(dataclasses.replace(cfg, reload_s=0))
    print(f"lakelens: serving {args.index} at http://{cfg.host}:{cfg.port}/ (API docs at /docs); "
          "Ctrl-C stops", file=sys.stderr)
    serve(cfg, token=token, engine=engine if cfg.workers == 1 else None, no_auth=args.no_auth)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfig, run

    run(DemoConfig(out=args.out, images=args.images, workers=args.workers, gpu=args.gpu,
                   quick=args.quick))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for pkg in ("pipelines", "models", "index"):
        logging.getLogger(pkg).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # lakelens reports its own progress; Ray Data's pages of it are for -v
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        commands = {"annotate": _annotate, "results": _results, "migrate": _migrate,
                    "forget": _forget, "index": _index, "query": _query, "eval": _eval,
                    "export": _export, "render": _render, "synth": _synth, "train": _train,
                    "demo": _demo, "submit": _submit, "jobs": _jobs, "serve": _serve, "dedup": _dedup}
        return commands[args.command](args)
    except LakelensError as e:
        print(f"lakelens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lakelens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
