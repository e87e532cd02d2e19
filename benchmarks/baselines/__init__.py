"""The baselines benchmarks/annotate.py runs as their own processes: the pipeline a user
writes from Ray Data's batch-inference docs (ray_docs.py) and from Daft's (daft_udf.py),
with one model class they share (predict.py)."""
