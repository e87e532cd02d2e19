"""The pipeline a user writes from Daft's (0.7) docs, as one script, on Daft's native
runner (one process; model instances are `@daft.cls` instances Daft runs side by side):

    df = daft.from_glob_path(f"{DIR}/*.jpg")
    df = df.with_column("image", col("path").download().decode_image(mode="RGB"))
    df = df.select("path", Model(...)(df["image"]))      # @daft.cls(max_concurrency=N),
    df.write_deltalake(OUT)                              # @daft.method.batch(batch_size=B)

N model instances (`max_concurrency` = the CPUs), each built once with one torch thread
(predict.py's DocsPredictor, the Ray docs script's model step); each row carries the
wall-clock time its batch was done (`t`) and the instance's pid and thread id.
benchmarks/annotate.py times this script from spawn to exit.

Usage: python benchmarks/baselines/daft_udf.py IMAGES_DIR OUT --task T --arch A --cpus N
"""

from __future__ import annotations

import daft
import pyarrow as pa
from daft import DataType, col

from benchmarks.baselines.predict import (  # the checkout is on PYTHONPATH
    DocsPredictor,
    output_schema,
    parse_args,
)


def model_class(task: str, cpus: int, batch_size: int) -> type:
    """The @daft.cls model UDF (a factory only because N and B come from the command line)."""
    schema = output_schema(task)

    @daft.cls(max_concurrency=cpus)
    class Model:
        def __init__(self, **kwargs):
            self.predictor = DocsPredictor(**kwargs)

        @daft.method.batch(return_dtype=DataType.from_arrow_type(pa.struct(schema)), unnest=True,
                           batch_size=batch_size)
        def __call__(self, images: daft.Series) -> pa.Array:
            cols = self.predictor(images.to_pylist())
            return pa.StructArray.from_arrays([pa.array(cols[f.name], f.type) for f in schema],
                                              fields=list(schema))

    return Model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    model = model_class(args.task, args.cpus, args.batch_size)(
        task=args.task, arch=args.arch, image_size=args.image_size, score_threshold=args.score_threshold)
    df = daft.from_glob_path(f"{args.images.rstrip('/')}/*.jpg")
    df = df.with_column("image", col("path").download().decode_image(mode="RGB"))
    df = df.select("path", model(df["image"]))
    df.write_deltalake(args.out)


if __name__ == "__main__":
    main()
