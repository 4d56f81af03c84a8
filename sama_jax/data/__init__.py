"""Data: manifests, ArrayRecord storage, Grain pipelines and host-side transforms."""
