"""The pipeline a user writes from Ray Data's batch-inference docs, as one script:

    ray.init(num_cpus=N)                       # a fresh local Ray, as the user's script starts
    ray.data.read_images(DIR, mode="RGB", include_paths=True)
      .map_batches(Predict, compute=ActorPoolStrategy(size=N), num_cpus=0.5, batch_size=B)
      .write_parquet(OUT)

One model actor per CPU with one torch thread each (predict.py's DocsPredictor); each
row carries the wall-clock time its batch was done (`t`) and the actor's pid.
benchmarks/annotate.py times this script from spawn to exit.

Usage: python benchmarks/baselines/ray_docs.py IMAGES_DIR OUT --task T --arch A --cpus N
"""

from __future__ import annotations

import numpy as np
import ray

# the checkout is on PYTHONPATH, the model actors' too
from benchmarks.baselines.predict import DocsPredictor, parse_args


class Predict:
    """The docs' callable class: the model is built once per actor."""

    def __init__(self, **kwargs):
        self.predictor = DocsPredictor(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return {"path": list(batch["path"]), **self.predictor(list(batch["image"]))}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    # address="local": a new instance even where another Ray on this machine is recorded
    # as the current cluster (what a plain ray.init() gives on the user's own machine)
    ray.init(address="local", num_cpus=args.cpus)
    ds = ray.data.read_images(args.images, mode="RGB", include_paths=True)
    ds = ds.map_batches(Predict, fn_constructor_kwargs={
        "task": args.task, "arch": args.arch, "image_size": args.image_size,
        "score_threshold": args.score_threshold},
        compute=ray.data.ActorPoolStrategy(size=args.cpus), num_cpus=0.5, batch_size=args.batch_size)
    ds.write_parquet(args.out)
    ray.shutdown()


if __name__ == "__main__":
    main()
