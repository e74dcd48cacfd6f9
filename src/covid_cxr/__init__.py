"""covid-cxr: chest X-ray classification by transfer learning, explained and served."""

__version__ = "0.1.0"
