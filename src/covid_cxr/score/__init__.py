"""Scoring an archive: `covid-cxr score` over hundreds of thousands of images, into Parquet parts,
resumable, in one process or on Ray. Torch-free (bundle.reader, data.decode, pyarrow)."""

from covid_cxr.score.archive import ScoreSummary, list_images, read_predictions, score_archive

__all__ = ["ScoreSummary", "list_images", "read_predictions", "score_archive"]
