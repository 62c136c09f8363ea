"""``tunelab ui``: a local web app over the same Python API as the CLI (see ``app``)."""
