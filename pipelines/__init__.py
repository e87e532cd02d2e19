"""lakelens jobs and their plumbing."""


def version() -> str:
    """The installed lakelens version ('unknown' when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lakelens")
    except PackageNotFoundError:
        return "unknown"
