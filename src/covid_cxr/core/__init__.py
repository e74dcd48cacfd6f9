"""The bottom layer: typed configurations and their defaults (TrainConfig, LungConfig), the
architecture registry's data, errors, and file helpers (atomic writes, progress). No torch, no
other covid_cxr package: everything else may import core, core imports nothing of ours."""
